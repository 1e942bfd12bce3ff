//! The C-STORE SCU (`cloudpdi import`) against real PACS peers: our own SCP, Orthanc,
//! and a DCMTK storescp that accepts only Implicit VR Little Endian.
//!
//! Orthanc and storescp cannot bind loopback only, so they run with `cloudpdi import`
//! inside a private network namespace whose only interface is `lo`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn import_command(pacs: &str, called: &str, paths: &[PathBuf]) -> String {
    let paths: Vec<String> = paths.iter().map(|p| format!("'{}'", p.display())).collect();
    format!(
        "{} import --pacs {pacs} --called {called} --associations 3 {}",
        env!("CARGO_BIN_EXE_cloudpdi"),
        paths.join(" ")
    )
}

#[test]
fn import_into_cloudpdi_sends_every_transfer_syntax_as_is_over_parallel_associations() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 30, &[]);
    let mut daemon = Daemon::start(dir.path(), CT_ROUTE);
    let mut files = corpus_files();
    files.push(study.clone());
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args([
            "import",
            "--called",
            "CLOUDPDI",
            "--associations",
            "4",
            "--pacs",
        ])
        .arg(daemon.dicom.to_string())
        .args(&files));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.stop().success());
    let log = daemon.log();
    assert!(log.matches("association accepted").count() >= 4, "{log}");
    let index = daemon.index();
    let mut sent: Vec<PathBuf> = files_in(&study);
    sent.extend(corpus_files());
    for file in &sent {
        let record = index
            .instance("ct", &sop_instance_uid(file))
            .unwrap()
            .unwrap_or_else(|| panic!("{} not received", file.display()));
        let (ts, _) = meta_of(file);
        // Deflate is a transport encoding: it travels inflated (see dicom::scu).
        let expected = match ts.as_str() {
            "1.2.840.10008.1.2.1.99" => "1.2.840.10008.1.2.1",
            other => other,
        };
        assert_eq!(
            record.transfer_syntax,
            expected,
            "{} was re-encoded",
            file.display()
        );
        assert_same_dataset(file, &daemon.spooled(&record));
    }
}

/// Starts Orthanc in a private network namespace, runs `import` (a `cloudpdi import`
/// command line) against it, then `query` (shell, may use curl on 127.0.0.1:8042).
fn with_orthanc(dir: &Path, import: &str, query: &str) -> Output {
    require("/usr/sbin/Orthanc");
    let config = orthanc_config(dir);
    in_netns(&format!(
        "/usr/sbin/Orthanc '{}' >'{}.log' 2>&1 & peer=$!
         for i in $(seq 300); do curl -sf http://127.0.0.1:8042/system >/dev/null && break; sleep 0.1; done
         {import}
         {query}",
        config.display(),
        config.display(),
    ))
}

#[test]
fn import_into_orthanc_stores_every_instance() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 40, &["--charset", "iso2022"]);
    let corpus = corpus_files();
    let mut files = vec![study.clone()];
    files.extend(corpus.iter().cloned());
    let expected = files_in(&study).len() + corpus.len();
    let out = with_orthanc(
        dir.path(),
        &import_command("127.0.0.1:4242", "ORTHANC", &files),
        "curl -sf http://127.0.0.1:8042/statistics",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find('{').expect("Orthanc statistics in the output");
    let statistics: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(
        statistics["CountInstances"].as_u64().unwrap() as usize,
        expected,
        "{stdout}"
    );
}

#[test]
fn import_with_a_local_patient_id_reconciles_every_instance_in_orthanc() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(
        &study,
        3,
        &["--charset", "iso2022", "--patient-id", "OSAKA-42"],
    );
    let compressed: Vec<PathBuf> = corpus_files()
        .into_iter()
        .filter(|f| {
            let ts = meta_of(f).0;
            ts == "1.2.840.10008.1.2.4.50" || ts == "1.2.840.10008.1.2.4.90"
        })
        .take(2)
        .collect();
    assert_eq!(
        compressed.len(),
        2,
        "JPEG and JPEG 2000 files in the corpus"
    );
    let mut files = vec![study.clone()];
    files.extend(compressed);
    let import = format!(
        "{} --patient-id L-777 --issuer KYOTO-UH",
        import_command("127.0.0.1:4242", "ORTHANC", &files)
    );
    let query = "for i in $(curl -sf http://127.0.0.1:8042/instances | python3 -c 'import json,sys; print(\" \".join(json.load(sys.stdin)))'); do
           curl -sf http://127.0.0.1:8042/instances/$i/simplified-tags | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'
         done";
    let out = with_orthanc(dir.path(), &import, query);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let instances: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(instances.len(), 5, "{stdout}");
    for tags in &instances {
        assert_eq!(tags["PatientID"], "L-777", "{tags}");
        assert_eq!(tags["IssuerOfPatientID"], "KYOTO-UH", "{tags}");
        let others = tags["OtherPatientIDsSequence"]
            .as_array()
            .expect("sequence");
        assert_eq!(others.len(), 1, "{tags}");
        assert!(others[0]["PatientID"].is_string() && others[0]["PatientID"] != "L-777");
    }
    let generated: Vec<_> = instances
        .iter()
        .filter(|t| t["OtherPatientIDsSequence"][0]["PatientID"] == "OSAKA-42")
        .collect();
    assert_eq!(generated.len(), 3, "the original ID is kept: {instances:?}");
    for tags in generated {
        let name = tags["PatientName"].as_str().unwrap();
        assert!(name.contains("山田^太郎"), "Japanese name survived: {name}");
    }
}

#[test]
fn implicit_only_pacs_gets_converted_data_and_compressed_data_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    let jpeg: PathBuf = corpus_files()
        .into_iter()
        .find(|f| meta_of(f).0 == "1.2.840.10008.1.2.4.50")
        .expect("the corpus has a JPEG baseline file");
    let received = dir.path().join("received");
    std::fs::create_dir_all(&received).unwrap();
    let out = in_netns(&format!(
        "{} +xi -od '{}' 11113 & peer=$!
         for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/11113) 2>/dev/null && break; sleep 0.05; done
         {} --transcode never || echo import-exit=$?",
        require("/usr/bin/storescp"),
        received.display(),
        import_command(
            "127.0.0.1:11113",
            "ANY-SCP",
            &[study.clone(), jpeg.clone()]
        )
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("import-exit=1"),
        "a refusal fails the import: {stdout}"
    );
    assert!(
        stdout.contains("3 of 4 instances stored, 1 refused"),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("refused: {}", jpeg.display()))
            && stderr.contains("does not accept transfer syntax 1.2.840.10008.1.2.4.50")
            && stderr.contains(r#"set inbound.transcode = "when-refused""#),
        "{stderr}"
    );
    let stored = files_in(&received);
    assert_eq!(stored.len(), 3);
    for file in &stored {
        assert_eq!(
            meta_of(file).0,
            "1.2.840.10008.1.2",
            "converted to implicit VR"
        );
    }
    let originals = files_in(&study);
    for original in &originals {
        let uid = sop_instance_uid(original);
        let copy = stored
            .iter()
            .find(|f| sop_instance_uid(f) == uid)
            .unwrap_or_else(|| panic!("{uid} missing"));
        assert_same_dataset(original, Path::new(copy));
    }
}

#[test]
fn unreachable_pacs_fails_every_instance_quickly_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 20, &[]);
    let started = std::time::Instant::now();
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args([
            "import",
            "--called",
            "PACS",
            "--attempts",
            "2",
            "--associations",
            "2",
        ])
        .arg("--pacs")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg(&study));
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stdout.contains("0 of 20 instances stored, 0 refused, 20 not sent"),
        "{stdout}"
    );
    // One cause for the import, not a line per file.
    assert!(
        stderr.contains("20 of 20 instances were not sent: the PACS at 127.0.0.1:")
            && stderr.contains("cannot be reached")
            && !stderr.contains("refused: "),
        "{stderr}"
    );
    // Refused connections are immediate; one 0.5 s back-off per lane takes ~0.5 s, while
    // a back-off per instance (10 per lane) would take 5 s or more.
    assert!(
        elapsed < std::time::Duration::from_millis(4500),
        "one back-off per lane, not per instance: {elapsed:?}"
    );
}
