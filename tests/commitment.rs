//! Storage Commitment Push Model (issue 14, items 2 and 3): a pynetdicom requester asks
//! the real `cloudpdi serve` to commit what it sent, with the report on the same
//! association and on a new one; instances the gateway does not hold, or holds under
//! another SOP class, are failed with the standard's reasons, and a request covering a
//! whole batch closes it at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";

#[derive(Debug, serde::Deserialize)]
struct Outcome {
    action_status: i64,
    event: u16,
    transaction_matches: bool,
    committed: Vec<String>,
    failed: Vec<(String, u16)>,
}

fn request(daemon: &Daemon, calling: &str, mode: &str, listen: u16, refs: &[String]) -> Outcome {
    let out = run(Command::new("python3")
        .arg(root().join("tests/peers/commit.py"))
        .args([
            "127.0.0.1",
            &daemon.dicom.port().to_string(),
            "CLOUDPDI",
            calling,
            mode,
            &listen.to_string(),
        ])
        .args(refs));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "commit.py failed: {stdout}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("commit.py said {stdout:?} ({e})\nlog:\n{}", daemon.log()))
}

fn study(dir: &Path) -> Vec<PathBuf> {
    gen_ct(dir, 3, &[]);
    files_in(dir)
}

/// The report on the same association fails the instance the gateway never received
/// (0x0112) and the one named with another SOP class (0x0119), commits the rest, and
/// leaves the batch open (not all of it was committed); the report on a new association
/// (configured for the caller) commits the whole batch, which closes at once although
/// its route waits 600 s for stability.
#[test]
fn pynetdicom_requester_gets_reports_on_both_associations() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let routes = format!(
        "[route.ct]\nae_title = \"CLOUDPDI\"\nstable_after = 600\n\
         [dicom.commitment.NEWASSOC]\nreport = \"new-association\"\n\
         address = \"127.0.0.1:{listen}\"\n"
    );
    let daemon = Daemon::start(&dir.path().join("gw"), &routes);
    let files = study(&dir.path().join("study"));
    let stored = pynetdicom_store(&daemon, "MODALITY", &files);
    assert!(stored.iter().all(|s| s.status == 0), "{stored:?}");
    let uids: Vec<String> = files.iter().map(|f| sop_instance_uid(f)).collect();

    let mut refs: Vec<String> = uids[1..].iter().map(|u| format!("{CT}:{u}")).collect();
    refs.push(format!("{SECONDARY_CAPTURE}:{}", uids[0]));
    refs.push(format!("{CT}:1.2.826.0.1.3680043.99.1"));
    let same = request(&daemon, "MODALITY", "same", listen, &refs);
    assert_eq!((same.action_status, same.event), (0, 2), "{same:?}");
    assert!(same.transaction_matches);
    let mut committed = same.committed.clone();
    committed.sort();
    let mut expected = uids[1..].to_vec();
    expected.sort();
    assert_eq!(committed, expected);
    assert!(same.failed.contains(&(uids[0].clone(), 0x0119)), "{same:?}");
    assert!(
        same.failed
            .contains(&("1.2.826.0.1.3680043.99.1".to_owned(), 0x0112)),
        "{same:?}"
    );
    let batches = daemon.status()["batches"].as_array().unwrap().clone();
    assert!(batches.iter().all(|b| b["state"] == "open"), "{batches:?}");

    let refs: Vec<String> = uids.iter().map(|u| format!("{CT}:{u}")).collect();
    let new = request(&daemon, "NEWASSOC", "new", listen, &refs);
    assert_eq!((new.action_status, new.event), (0, 1), "{new:?}");
    assert!(new.transaction_matches && new.failed.is_empty(), "{new:?}");
    assert_eq!(new.committed.len(), 3);
    daemon.wait_stable_batch(3, Duration::from_secs(5));
    let log = daemon.log();
    assert!(
        log.contains("batch closed by a storage commitment request"),
        "{log}"
    );
    assert!(
        log.contains("storage commitment report answered by the requester"),
        "the same-association report was not answered:\n{log}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("report sent on a new association") {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not log the report sent on a new association:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
