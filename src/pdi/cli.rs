//! What `cloudpdi pdi build|verify` needs besides the builder and the reader: the AI
//! policy from command-line words, a build into a new folder or a new ZIP file, and the
//! summaries printed for a person.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::{AiAction, AiPolicy, BuildOptions, BuildReport, PdiError, Summary, policy};
use crate::telemetry::{Escaped, escape};

/// The AI support-image policy of `--ai-action`, `--ai-mark-series` and `--ai-rule`
/// (rules given replace the default ones).
///
/// # Errors
/// [`PdiError::Invalid`] naming the rule that does not parse.
pub fn ai_policy(
    action: AiAction,
    mark_series_description: bool,
    rules: &[String],
) -> Result<AiPolicy, PdiError> {
    let mut policy = AiPolicy {
        action,
        mark_series_description,
        ..AiPolicy::default()
    };
    if !rules.is_empty() {
        policy.rules = rules
            .iter()
            .map(|rule| {
                policy::parse_rule(rule).map_err(|e| PdiError::Invalid(format!("--ai-rule {e}")))
            })
            .collect::<Result<_, _>>()?;
    }
    Ok(policy)
}

/// Builds a file set from `inputs` into `out`: a new ZIP file when `out` ends in `.zip`,
/// else a new or empty folder; what the build created is removed again when it fails.
///
/// # Errors
/// [`PdiError`]; [`PdiError::NoInstances`] when the inputs hold no DICOM instance.
pub fn build(
    inputs: &[PathBuf],
    options: &BuildOptions,
    out: &Path,
) -> Result<BuildReport, PdiError> {
    let is_zip = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"));
    if !is_zip {
        let existed = out.exists();
        let built = super::build_dir(inputs, options, out);
        if built.is_err() && !existed {
            let _ = std::fs::remove_dir_all(out);
        }
        return built;
    }
    let built = crate::durable::create_new(out, 0o666, |file| {
        super::build_zip(inputs, options, std::io::BufWriter::new(file)).map_err(ZipFailure::Build)
    });
    built.map_err(|failure| match failure {
        ZipFailure::Build(e) => e,
        ZipFailure::File(source) => PdiError::Io {
            path: out.to_owned(),
            source,
        },
    })
}

/// What stops a ZIP file set being written: the build, or the output file itself (which
/// then needs its path in the message).
enum ZipFailure {
    Build(PdiError),
    File(std::io::Error),
}

impl From<std::io::Error> for ZipFailure {
    fn from(e: std::io::Error) -> Self {
        ZipFailure::File(e)
    }
}

/// The lines `pdi build` prints: skipped files and warnings (for standard error), then
/// the one-line summary.
pub fn describe_build(out: &Path, report: &BuildReport) -> (Vec<String>, String) {
    let mut notes: Vec<String> = report
        .skipped
        .iter()
        .map(|skipped| {
            format!(
                "skipped (not DICOM): {}",
                escape(&skipped.display().to_string())
            )
        })
        .collect();
    notes.extend(
        report
            .warnings
            .iter()
            .map(|warning| format!("warning: {}", Escaped(warning))),
    );
    let summary = format!(
        "{}: {} patients, {} studies, {} series, {} instances ({} labelled, {} excluded as AI \
         support images, {} duplicates), {} attachments, {} bytes",
        escape(&out.display().to_string()),
        report.patients,
        report.studies,
        report.series,
        report.instances,
        report.labelled,
        report.excluded,
        report.duplicates,
        report.attachments,
        report.bytes
    );
    (notes, summary)
}

/// What `pdi verify` prints for a set that passed.
pub fn describe_summary(path: &Path, summary: &Summary) -> String {
    let mut out = format!(
        "{}: OK\npatients: {}\nstudies: {}\nseries: {}\ninstances: {}\nmodalities: {}\nsize: {} \
         bytes in {} files\nmanifest: {}\nAI support images: {} labelled, {} left out\n",
        escape(&path.display().to_string()),
        summary.patients,
        summary.studies,
        summary.series,
        summary.instances,
        summary.modalities.join(", "),
        summary.bytes,
        summary.files,
        if summary.manifest {
            "present, every file matches"
        } else {
            "absent (not a cloudpdi set)"
        },
        summary.ai_labelled,
        summary.ai_excluded,
    );
    for problem in &summary.problems {
        let _ = writeln!(out, "note: {}", Escaped(problem));
    }
    out
}
