//! moto's S3-compatible server, the real object store of the S3 tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudpdi::repository::config::{Backend, StorageConfig};

/// moto's S3 server on loopback, killed when dropped.
pub struct Moto {
    child: Child,
    /// Base URL of the S3 API.
    pub endpoint: String,
}

impl Moto {
    /// Starts moto on a free port and creates `bucket`; a missing moto fails the test.
    pub fn start(bucket: &str) -> Moto {
        let port = super::free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]') is a required test peer");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(super::require("/usr/bin/curl"))
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
                .arg(format!("{}/{bucket}", moto.endpoint))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout) == "200" {
                return moto;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The repository's storage settings for `bucket` on this server.
    pub fn storage(&self, bucket: &str) -> StorageConfig {
        StorageConfig {
            backend: Backend::S3,
            bucket: bucket.into(),
            endpoint: self.endpoint.clone(),
            allow_http: true,
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            ..StorageConfig::default()
        }
    }

    /// Every object in the bucket: (key, bytes), read with signed requests (moto answers
    /// anonymous reads 403, which would leave nothing to scan).
    pub fn objects(&self, bucket: &str) -> Vec<(String, Vec<u8>)> {
        let signed = [
            "-s",
            "-f",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            "testing:testing",
        ];
        let list = Command::new("/usr/bin/curl")
            .args(signed)
            .arg(format!("{}/{bucket}?list-type=2", self.endpoint))
            .output()
            .unwrap();
        let xml = String::from_utf8_lossy(&list.stdout).into_owned();
        xml.split("<Key>")
            .skip(1)
            .map(|rest| {
                let key = rest.split("</Key>").next().unwrap().to_owned();
                let body = Command::new("/usr/bin/curl")
                    .args(signed)
                    .arg(format!("{}/{bucket}/{key}", self.endpoint))
                    .output()
                    .unwrap();
                assert!(body.status.success(), "cannot read {key} from moto");
                (key, body.stdout)
            })
            .collect()
    }
}

impl Moto {
    /// Replaces object `key` of `bucket` with `bytes` (a signed PUT), behind the
    /// repository's back.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        let out = Command::new("/usr/bin/curl")
            .args(["-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", "testing:testing"])
            // A form's content type would make moto read the body as a form (and store
            // nothing).
            .args(["-H", "Content-Type: application/octet-stream", "-T"])
            .arg(file.path())
            .arg(format!("{}/{bucket}/{key}", self.endpoint))
            .output()
            .unwrap();
        assert!(out.status.success(), "cannot write {key} to moto");
    }

    /// Deletes object `key` of `bucket` (a signed DELETE), behind the repository's back.
    pub fn delete(&self, bucket: &str, key: &str) {
        let out = Command::new("/usr/bin/curl")
            .args(["-s", "-f", "--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", "testing:testing", "-X", "DELETE"])
            .arg(format!("{}/{bucket}/{key}", self.endpoint))
            .output()
            .unwrap();
        assert!(out.status.success(), "cannot delete {key} from moto");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
