//! Reading a configuration file and its environment overrides, with errors that name the
//! key, its value, where the value came from and what form it must take.
//!
//! The `config` crate merges the TOML file and the `PREFIX_SECTION__KEY` variables; the
//! typed structs are then read through `serde_path_to_error`, so that a wrong value deep
//! inside (`route.ct.stable_after`) is reported with its path rather than with the name
//! of the outermost table. The variables are read here too, so that a value set by one is
//! blamed on the variable, not on the file, and so that a variable cannot create an entry
//! of a table keyed by the site's own names (a route, a facility) that the file lacks.
//! Both the gateway ([`crate::config::Config`]) and the repository
//! ([`crate::repository::config::RepositoryConfig`]) load through [`load`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Value, ValueKind};
use serde::de::DeserializeOwned;

/// Longest value quoted in an error; longer ones are cut (a pasted certificate, a path).
const MAX_SHOWN_VALUE: usize = 80;

/// What one program reads: its file and its environment variables.
pub(crate) struct Sources<'a> {
    /// The TOML file.
    pub path: &'a Path,
    /// Prefix of the override variables, with its `_` (`CLOUDPDI_`).
    pub prefix: &'a str,
    /// Prefixes of other programs' variables, which are not overrides.
    pub skip: &'a [&'a str],
    /// Tables keyed by names the site chooses (`route`, `facility`): a variable may change
    /// an entry the file defines but not create one.
    pub named_tables: &'a [&'a str],
    /// The enums of the configuration, by type name, with the values the file may write
    /// ([`variants_of`]): the `config` crate's message for a bad value names only the type.
    pub enums: &'a [(&'static str, &'static [&'static str])],
}

/// An enum's type name and the names of its values as the file writes them, read from
/// its `Deserialize` implementation so that the list cannot drift from the type.
pub(crate) fn variants_of<T: DeserializeOwned>() -> (&'static str, &'static [&'static str]) {
    let mut captured = None;
    // The capture always ends in an error once it has seen the enum's names.
    let _ = T::deserialize(EnumNames(&mut captured));
    captured.unwrap_or(("", &[]))
}

/// A deserializer that only records the names an enum's `Deserialize` announces.
struct EnumNames<'a>(&'a mut Option<(&'static str, &'static [&'static str])>);

impl<'de> serde::Deserializer<'de> for EnumNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not an enum"))
    }

    fn deserialize_enum<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some((name, variants));
        Err(serde::de::Error::custom("names captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    File(PathBuf),
    /// An environment variable, by name.
    Variable(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "in {}", path.display()),
            Origin::Variable(name) => write!(f, "from the environment variable {name}"),
        }
    }
}

/// A key whose value cannot be used: what an admin needs to find and fix it.
#[derive(Debug, Clone)]
pub struct KeyError {
    /// The key's path, e.g. `route.ct.stable_after`.
    pub key: String,
    /// The value as written (cut, and left out for secrets); `None` for a whole table.
    pub value: Option<String>,
    /// The file or the variable that set it.
    pub origin: Origin,
    /// What is wrong and the form expected.
    pub problem: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{} = {value} ", self.key)?,
            None => write!(f, "{} ", self.key)?,
        }
        write!(f, "{}: {}", self.origin, self.problem)
    }
}

impl std::error::Error for KeyError {}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file is missing, unreadable or not valid TOML.
    #[error("cannot read the configuration file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What the `config` crate reported (the TOML error names line and column).
        source: Box<config::ConfigError>,
    },
    /// A key is unknown or its value has the wrong form.
    #[error(transparent)]
    Key(Box<KeyError>),
    /// An environment variable cannot be used.
    #[error("the environment variable {name} {problem}")]
    Variable {
        /// The variable's name.
        name: String,
        /// What is wrong with it and what to do.
        problem: String,
    },
}

/// The override variables that were read, by the key path each sets.
pub(crate) struct Origins {
    file: PathBuf,
    variables: BTreeMap<String, String>,
    /// The file alone, to tell a table the file has from one a variable created.
    file_values: config::Config,
}

impl Origins {
    /// Where the value at `key` came from: the variable setting it (or a key below it,
    /// when the file does not have `key` at all), else the file.
    pub(crate) fn of(&self, key: &str) -> Origin {
        let below = |path: &str, parent: &str| {
            path.strip_prefix(parent)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        let exact_or_above = self
            .variables
            .iter()
            .find(|(path, _)| *path == key || below(key, path));
        if let Some((_, name)) = exact_or_above {
            return Origin::Variable(name.clone());
        }
        if self.file_values.get::<Value>(key).is_err()
            && let Some((_, name)) = self.variables.iter().find(|(path, _)| below(path, key))
        {
            return Origin::Variable(name.clone());
        }
        Origin::File(self.file.clone())
    }
}

impl Origins {
    /// `message`, a check's sentence that starts with the key it is about (e.g.
    /// `server.part_size_mb must be ...` or `route.ct.ai_support: ...`), followed by where
    /// that key came from, the file or a variable: what the admin must edit.
    pub(crate) fn locate(&self, message: &str) -> String {
        let key: String = message
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            .collect();
        if key.contains('.') {
            format!("{message} ({})", self.of(&key))
        } else {
            message.to_owned()
        }
    }
}

/// Reads `sources` into `T`, and tells where each overridden key came from (for the
/// errors of later checks).
///
/// # Errors
/// [`LoadError`] naming the file, the variable, or the key with its value and form.
pub(crate) fn load<T: DeserializeOwned>(sources: &Sources<'_>) -> Result<(T, Origins), LoadError> {
    let path = sources.path;
    let file_error = |source| LoadError::File {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let file_values = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .map_err(file_error)?;
    let raw = overrides(sources.prefix, sources.skip)?;
    let mut variables = BTreeMap::new();
    for name in raw.keys() {
        let key = key_of(name, sources.prefix);
        check_named_entry(&file_values, path, sources.named_tables, name, &key)?;
        variables.insert(key, name.clone());
    }
    let merged = config::Config::builder()
        .add_source(file_values.clone())
        .add_source(
            config::Environment::with_prefix(sources.prefix.trim_end_matches('_'))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(raw)),
        )
        .build()
        .map_err(file_error)?;
    let origins = Origins {
        file: path.to_owned(),
        variables,
        file_values,
    };
    match serde_path_to_error::deserialize::<_, T>(merged.clone()) {
        Ok(value) => Ok((value, origins)),
        Err(error) => {
            let key = error.path().to_string();
            let problem = problem_of(&key, error.inner(), sources.enums);
            let value = merged.get::<Value>(&key).ok().and_then(|v| shown(&key, &v));
            Err(LoadError::Key(Box::new(KeyError {
                origin: origins.of(&key),
                key,
                value,
                problem,
            })))
        }
    }
}

/// The `PREFIX_SECTION__KEY` variables of the environment that override configuration
/// keys: only names with a `__` (every key is in a section), and none starting with one
/// of `skip` (another program's prefix, e.g. the repository's `CLOUDPDI_REPO_` for the
/// gateway). So `CLOUDPDI_CONFIG`, `CLOUDPDI_REPO_CONFIG` and
/// `CLOUDPDI_REPOSITORY_API_KEY`, which the commands read, are never taken for keys.
fn overrides(prefix: &str, skip: &[&str]) -> Result<config::Map<String, String>, LoadError> {
    let mut map = config::Map::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !override_name(name, prefix, skip) {
            continue;
        }
        let value = value.into_string().map_err(|_| LoadError::Variable {
            name: name.to_owned(),
            problem: "is not UTF-8 text: set it again with the value in UTF-8".into(),
        })?;
        map.insert(name.to_owned(), value);
    }
    Ok(map)
}

/// Whether the variable `name` is a key override (see [`overrides`]).
pub(crate) fn override_name(name: &str, prefix: &str, skip: &[&str]) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.contains("__"))
        && !skip.iter().any(|s| name.starts_with(s))
}

/// The key path a variable sets, as the `config` crate reads it:
/// `CLOUDPDI_ROUTE__CT__STABLE_AFTER` -> `route.ct.stable_after`.
fn key_of(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_lowercase()
        .replace("__", ".")
}

/// Refuses a variable that would create an entry of a named table (`route.mr`) that the
/// file does not define: it would silently make a new route out of one key.
fn check_named_entry(
    file: &config::Config,
    path: &Path,
    named_tables: &[&str],
    name: &str,
    key: &str,
) -> Result<(), LoadError> {
    let mut parts = key.split('.');
    let (Some(table), Some(entry)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    if !named_tables.contains(&table) {
        return Ok(());
    }
    let defined = match file.get::<Value>(table).map(|v| v.kind) {
        Ok(ValueKind::Table(entries)) => entries.into_keys().collect::<Vec<_>>(),
        Ok(ValueKind::Array(_)) => {
            return Err(LoadError::Variable {
                name: name.to_owned(),
                problem: format!(
                    "sets {key}, but {} gives [[{table}]] as a list, whose entries a \
                     variable cannot name: write them as [{table}.NAME] tables",
                    path.display()
                ),
            });
        }
        _ => Vec::new(),
    };
    if defined.iter().any(|d| d == entry) {
        return Ok(());
    }
    if let Some(written) = defined.iter().find(|d| d.eq_ignore_ascii_case(entry)) {
        return Err(LoadError::Variable {
            name: name.to_owned(),
            problem: format!(
                "sets {key}, but variable names are read in lower case and {} names this \
                 {table} {written:?}: rename it [{table}.{entry}] in the file to change it \
                 from the environment",
                path.display()
            ),
        });
    }
    let known = if defined.is_empty() {
        "none".to_owned()
    } else {
        defined.join(", ")
    };
    Err(LoadError::Variable {
        name: name.to_owned(),
        problem: format!(
            "sets {key}, but {} defines no {table} {entry:?} (it defines: {known}); a \
             variable changes a {table} the file defines and cannot create one: add \
             [{table}.{entry}] to the file, or correct the variable's name",
            path.display()
        ),
    })
}

/// The value as it may be shown: cut to [`MAX_SHOWN_VALUE`], never a secret, `None` for
/// a table (the key names it well enough).
fn shown(key: &str, value: &Value) -> Option<String> {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    // A misspelt secret key is unknown, but its value is still the secret: any name that
    // sounds like one is hidden (`api_key` written for `api_key_file`), except the names
    // of key files and of key hashes, which are not secret.
    let names_a_secret = [
        "secret",
        "password",
        "passphrase",
        "token",
        "key",
        "credential",
    ]
    .iter()
    .any(|word| last.contains(word))
        && !last.ends_with("_file")
        && !last.ends_with("_sha256");
    if names_a_secret || strsim::damerau_levenshtein(&last, "secret_access_key") <= 4 {
        return Some("(value not shown)".into());
    }
    let text = match &value.kind {
        ValueKind::Table(_) => return None,
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Array(items) => {
            let items: Vec<String> = items.iter().filter_map(|v| shown(key, v)).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    };
    Some(match text.char_indices().nth(MAX_SHOWN_VALUE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    })
}

/// What is wrong with the value at `key`, and the form expected there.
fn problem_of(
    key: &str,
    error: &config::ConfigError,
    enums: &[(&'static str, &'static [&'static str])],
) -> String {
    let message = innermost(error);
    let hint = expected_form(key);
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let unknown = key.rsplit('.').next().unwrap_or(key);
        let allowed = quoted_after_first(rest);
        let closest = allowed
            .iter()
            .map(|name| (strsim::damerau_levenshtein(unknown, name), name))
            .filter(|(distance, _)| *distance <= 3)
            .min();
        let parent = key.rsplit_once('.').map_or("the top level", |(p, _)| p);
        let suggestion =
            closest.map_or(String::new(), |(_, name)| format!("did you mean {name}? "));
        return format!(
            "unknown key; {suggestion}the keys of {parent} are: {}",
            allowed.join(", ")
        );
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!(
            "not an allowed value; write one of: {}",
            quoted_after_first(rest).join(", ")
        );
    }
    if let Some(rest) = message.strip_prefix("enum ")
        && let Some((name, _)) = rest.split_once(" does not have variant constructor")
        && let Some((_, values)) = enums.iter().find(|(enum_name, _)| *enum_name == name)
    {
        return format!("not an allowed value; write one of: {}", values.join(", "));
    }
    match (hint, plain_form(&message)) {
        (Some(hint), _) => format!("write {hint}"),
        (None, Some(form)) => format!("{message}; write {form}"),
        (None, None) => message,
    }
}

/// The message of the error that started it all (without the key the `config` crate
/// prepends, which the path already names).
fn innermost(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::At { error, .. } => innermost(error),
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        other => other.to_string(),
    }
}

/// The back-quoted names after the first one in a serde message: "`x`, expected one of
/// `a`, `b`" -> [a, b].
fn quoted_after_first(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// A form an admin knows, from what serde expected (`None` when it did not say).
fn plain_form(message: &str) -> Option<&'static str> {
    let (_, expected) = message.rsplit_once("expected")?;
    Some(
        if expected.contains("integer") || expected.contains("u64") || expected.contains("u32") {
            "a whole number, without quotes or unit"
        } else if expected.contains("bool") {
            "true or false, without quotes"
        } else if expected.contains("sequence") || expected.contains("list") {
            "a list such as [\"A\", \"B\"]"
        } else if expected.contains("map") || expected.contains("struct") {
            "a table such as [section.name]"
        } else {
            "text in quotes"
        },
    )
}

/// The form of the keys whose type alone does not say it (units, addresses).
fn expected_form(key: &str) -> Option<&'static str> {
    const SECONDS: &str = "whole seconds, a number without quotes or unit (e.g. 30)";
    const FORMS: &[(&str, &str)] = &[
        (
            "dicom.listen",
            "host:port, e.g. 0.0.0.0:11112 (every address) or 10.1.2.3:104",
        ),
        (
            "dicom.tls.listen",
            "host:port, e.g. 0.0.0.0:2762 (every address) or 10.1.2.3:2762",
        ),
        ("admin.listen", "a loopback host:port, e.g. 127.0.0.1:11180"),
        (
            "repository.embedded_listen",
            "a loopback host:port, e.g. 127.0.0.1:11190",
        ),
        ("server.listen", "host:port, e.g. 0.0.0.0:8480"),
        ("stable_after", SECONDS),
        ("association_timeout", SECONDS),
        ("idle_timeout", SECONDS),
        ("store_idle_timeout", SECONDS),
        ("poll_interval", SECONDS),
        ("max_backoff", SECONDS),
        ("body_idle_timeout", SECONDS),
        ("sweep_interval", SECONDS),
        ("failed_proof_window", SECONDS),
        ("download_resume_window", SECONDS),
        ("header_timeout", SECONDS),
        (
            "retention_hours",
            "whole hours, a number without quotes or unit (e.g. 168)",
        ),
        (
            "records_days",
            "whole days, a number without quotes or unit (e.g. 90)",
        ),
        (
            "expires_in_days",
            "whole days, a number without quotes or unit (e.g. 14)",
        ),
        (
            "tombstone_days",
            "whole days, a number without quotes or unit (e.g. 30)",
        ),
        (
            "max_expiry_days",
            "whole days, a number without quotes or unit (e.g. 180)",
        ),
        (
            "min_free_mb",
            "whole MiB, a number without quotes or unit (e.g. 1024)",
        ),
        (
            "max_document_mb",
            "whole MiB, a number without quotes or unit (e.g. 20480)",
        ),
        (
            "part_size_mb",
            "whole MiB, a number without quotes or unit (e.g. 8)",
        ),
    ];
    let last = key.rsplit('.').next().unwrap_or(key);
    FORMS
        .iter()
        .find(|(name, _)| *name == key)
        .or_else(|| FORMS.iter().find(|(name, _)| *name == last))
        .map(|(_, form)| *form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variable_is_blamed_for_the_key_it_sets_or_creates() {
        let origins = Origins {
            file: PathBuf::from("/etc/c.toml"),
            variables: BTreeMap::from([
                ("dicom.listn".to_owned(), "CLOUDPDI_DICOM__LISTN".to_owned()),
                ("dicm.listen".to_owned(), "CLOUDPDI_DICM__LISTEN".to_owned()),
            ]),
            file_values: config::Config::builder()
                .add_source(config::File::from_str(
                    "[dicom]\nlisten = \"127.0.0.1:1\"\n",
                    config::FileFormat::Toml,
                ))
                .build()
                .expect("TOML"),
        };
        let variable = |name: &str| Origin::Variable(name.to_owned());
        assert_eq!(origins.of("dicom.listn"), variable("CLOUDPDI_DICOM__LISTN"));
        assert_eq!(origins.of("dicm"), variable("CLOUDPDI_DICM__LISTEN"));
        assert_eq!(origins.of("dicom"), Origin::File("/etc/c.toml".into()));
        assert_eq!(
            origins.of("dicom.listen"),
            Origin::File("/etc/c.toml".into())
        );
    }

    #[test]
    fn enum_values_are_read_from_the_type() {
        assert_eq!(
            variants_of::<crate::config::BatchBy>(),
            ("BatchBy", &["study", "patient"][..])
        );
    }

    #[test]
    fn secrets_are_not_shown_and_long_values_are_cut() {
        let text = |s: &str| Value::new(None, ValueKind::String(s.to_owned()));
        for key in [
            "storage.secret_access_key",
            "storage.secrt_acess_key",
            "repository.api_key",
            "repository.API_KEY",
            "tls.private_key",
        ] {
            assert_eq!(
                shown(key, &text("abc")).as_deref(),
                Some("(value not shown)"),
                "{key}"
            );
        }
        for key in ["repository.api_key_file", "facility.x.api_key_sha256"] {
            assert_eq!(
                shown(key, &text("abc")).as_deref(),
                Some("\"abc\""),
                "{key}"
            );
        }
        let long = shown("tls.cert", &text(&"x".repeat(500))).expect("shown");
        assert!(long.len() < 100 && long.ends_with("..."), "{long}");
    }
}
