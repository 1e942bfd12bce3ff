//! DICOM TLS (issue 14 item 1) with real peers: DCMTK's storescu and echoscu `+tls`
//! against the daemon's TLS listener (beside the plain one), and `cloudpdi import` into
//! Orthanc with `DicomTlsEnabled`. Certificates are made here with `openssl`: a CA, a
//! server certificate for 127.0.0.1 / localhost, a client certificate, an expired one,
//! and a client certificate from another CA.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// A folder `certs` in `dir` with the test's CA and certificates.
fn certificates_in(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    certificates(&certs);
    certs
}

/// The daemon in `dir/site` with `dicom` settings and a TLS listener on a free port with
/// the server certificate (and `tls` settings added to `[dicom.tls]`); the daemon and
/// the TLS port.
fn tls_daemon(dir: &Path, certs: &Path, dicom: &str, tls: &str) -> (Daemon, u16) {
    let tls_port = free_port();
    let daemon = Daemon::start_tuned(
        &dir.join("site"),
        CT_ROUTE,
        &format!(
            "{dicom}[dicom.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = \"{}\"\n\
             key = \"{}\"\n{tls}",
            pem(certs, "server"),
            key(certs, "server"),
        ),
    );
    (daemon, tls_port)
}

/// Makes the certificates under `dir`: `ca`, `other` (another CA), `server` and `expired`
/// (127.0.0.1 / localhost, from `ca`; `expired` valid only on 1 January 2020), `client`
/// (from `ca`), `stranger` (from `other`) and `late` (a client certificate from `ca`,
/// expired); each as NAME.pem and NAME.key.
fn certificates(dir: &Path) {
    let script = r#"set -e
ca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout $1.key -out $1.pem -days 2 -subj "/CN=$1 test CA"; }
leaf() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $1.key \
    -out $1.csr -subj "/CN=$1"
  printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\n" "$4" > $1.ext
  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -days $3 \
    -extfile $1.ext -out $1.pem
}
# openssl x509 cannot set a start date: `openssl ca` signs the expired ones.
old() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $1.key \
    -out $1.csr -subj "/CN=$1"
  printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\n" "$2" > $1.ext
  openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in $1.csr -out $1.pem \
    -startdate 20200101000000Z -enddate 20200102000000Z -extfile $1.ext -notext
}
mkdir -p db; : > db/index.txt; echo 01 > db/serial
printf '[ca]\ndefault_ca = d\n[d]\ndatabase = db/index.txt\nnew_certs_dir = db\nserial = db/serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n' > ca.cnf
ca ca; ca other
leaf server ca 2 "IP:127.0.0.1,DNS:localhost"
old expired "IP:127.0.0.1,DNS:localhost"
leaf client ca 2 "DNS:client"
old late "DNS:late"
leaf stranger other 2 "DNS:stranger"
openssl pkey -in client.key -aes256 -passout pass:test -out encrypted.key
chmod 644 *.key
"#;
    require("/usr/bin/openssl");
    let out = run(Command::new(require("/usr/bin/bash"))
        .args(["-c", script])
        .current_dir(dir));
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pem(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.pem")).display().to_string()
}

fn key(dir: &Path, name: &str) -> String {
    dir.join(format!("{name}.key")).display().to_string()
}

/// DCMTK `program` (storescu or echoscu) to 127.0.0.1:`port`, calling AE MODALITY.
fn dcmtk(program: &str, port: u16, args: &[&str], files: &[PathBuf]) -> Output {
    run(Command::new(require(program))
        .args(["-aet", "MODALITY", "-aec", "CLOUDPDI"])
        .args(args)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(files))
}

#[test]
fn dcmtk_stores_over_tls_beside_the_plain_port_and_each_refusal_names_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates_in(dir.path());
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    let plain_study = dir.path().join("plain");
    gen_ct(&plain_study, 2, &[]);
    let (mut daemon, tls_port) = tls_daemon(
        dir.path(),
        &certs,
        "",
        &format!("client_ca = \"{}\"\n", pem(&certs, "ca")),
    );
    let (ca, client, client_key) = (
        pem(&certs, "ca"),
        pem(&certs, "client"),
        key(&certs, "client"),
    );
    let tls = [
        "+tls",
        client_key.as_str(),
        client.as_str(),
        "+cf",
        ca.as_str(),
    ];

    let stored = dcmtk("/usr/bin/storescu", tls_port, &tls, &files_in(&study));
    assert!(stored.status.success(), "storescu +tls: {}", text(&stored));
    let echo = dcmtk("/usr/bin/echoscu", tls_port, &tls, &[]);
    assert!(echo.status.success(), "echoscu +tls: {}", text(&echo));
    let plain = dcmtk(
        "/usr/bin/storescu",
        daemon.dicom.port(),
        &[],
        &files_in(&plain_study),
    );
    assert!(plain.status.success(), "plain storescu: {}", text(&plain));

    // A client certificate from another CA, and an expired one from the right CA.
    let (stranger, stranger_key) = (pem(&certs, "stranger"), key(&certs, "stranger"));
    let refused = dcmtk(
        "/usr/bin/echoscu",
        tls_port,
        &["+tls", &stranger_key, &stranger, "+cf", &ca],
        &[],
    );
    assert!(!refused.status.success(), "a stranger's certificate passed");
    let (late, late_key) = (pem(&certs, "late"), key(&certs, "late"));
    let expired = dcmtk(
        "/usr/bin/echoscu",
        tls_port,
        &["+tls", &late_key, &late, "+cf", &ca],
        &[],
    );
    assert!(!expired.status.success(), "an expired certificate passed");
    // A client that does not trust the gateway's certificate.
    let distrust = dcmtk(
        "/usr/bin/echoscu",
        tls_port,
        &["+tls", &client_key, &client, "+cf", &pem(&certs, "other")],
        &[],
    );
    assert!(!distrust.status.success(), "an untrusted server passed");
    // Plain on the TLS port, TLS on the plain port.
    let plain_on_tls = dcmtk("/usr/bin/echoscu", tls_port, &[], &[]);
    assert!(
        !plain_on_tls.status.success(),
        "plain echoscu on the TLS port"
    );
    let tls_on_plain = dcmtk("/usr/bin/echoscu", daemon.dicom.port(), &tls, &[]);
    assert!(
        !tls_on_plain.status.success(),
        "TLS echoscu on the plain port"
    );

    assert!(daemon.stop().success());
    let log = daemon.log();
    for expected in [
        "the client's certificate is not trusted: it is not signed by a CA in the CA file \
         dicom.tls.client_ca",
        "the client's certificate expired on ",
        "the client does not trust the gateway's certificate (dicom.tls.certificate",
        "a plain (non-TLS) DICOM client connected to the TLS port",
        "a TLS client connected to the plain DICOM port",
    ] {
        assert_eq!(
            log.matches(expected).count(),
            1,
            "logged once: {expected}\n{log}"
        );
    }
    let index = daemon.index();
    for file in files_in(&study).iter().chain(&files_in(&plain_study)) {
        let record = index
            .instance("ct", &sop_instance_uid(file))
            .unwrap()
            .unwrap_or_else(|| panic!("{} not in the spool", file.display()));
        assert_same_dataset(file, &daemon.spooled(&record));
    }
}

/// An Orthanc configuration with DICOM TLS on port 4242 (certificate `cert`), trusting
/// `ca` for client certificates, which it requires.
fn orthanc_tls_config(dir: &Path, certs: &Path, cert: &str) -> PathBuf {
    let config = orthanc_config(&dir.join(cert));
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["DicomTlsEnabled"] = true.into();
    json["DicomTlsCertificate"] = pem(certs, cert).into();
    json["DicomTlsPrivateKey"] = key(certs, cert).into();
    json["DicomTlsTrustedCertificates"] = pem(certs, "ca").into();
    json["DicomTlsRemoteCertificateRequired"] = true.into();
    std::fs::write(&config, json.to_string()).unwrap();
    config
}

#[test]
fn import_into_orthanc_over_tls_and_a_wrong_ca_or_an_expired_certificate_is_named() {
    require("/usr/sbin/Orthanc");
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates_in(dir.path());
    let study = dir.path().join("study");
    gen_ct(&study, 3, &[]);
    let good = orthanc_tls_config(dir.path(), &certs, "server");
    let expired = orthanc_tls_config(dir.path(), &certs, "expired");
    let import_as = |tls: &str, out: &str| {
        format!(
            "if {} import --pacs 127.0.0.1:4242 --called ORTHANC --attempts 1 {tls} '{}' \
             >'{out}' 2>&1; then echo 0 >'{out}.rc'; else echo $? >'{out}.rc'; fi",
            env!("CARGO_BIN_EXE_cloudpdi"),
            study.display()
        )
    };
    let tls_args = |ca: &str, client: &str| {
        format!(
            "--tls-ca '{}' --tls-certificate '{}' --tls-key '{}'",
            pem(&certs, ca),
            pem(&certs, client),
            key(&certs, client)
        )
    };
    let import = |ca: &str, out: &str| import_as(&tls_args(ca, "client"), out);
    let out_of = |name: &str| dir.path().join(format!("{name}.out")).display().to_string();
    let orthanc = |config: &Path| {
        format!(
            "/usr/sbin/Orthanc '{0}' >'{0}.log' 2>&1 & peer=$!
             for i in $(seq 300); do curl -sf http://127.0.0.1:8042/system >/dev/null && break; sleep 0.1; done",
            config.display()
        )
    };
    let script = format!(
        "{}\n{}\n{}\ncurl -sf http://127.0.0.1:8042/statistics >'{}'\n{}\n{}\n\
         kill $peer; wait $peer || true\n{}\n{}\n",
        orthanc(&good),
        import("ca", &out_of("good")),
        import("other", &out_of("wrong_ca")),
        out_of("statistics"),
        import_as("", &out_of("plain")),
        import_as(&tls_args("ca", "stranger"), &out_of("stranger")),
        orthanc(&expired),
        import("ca", &out_of("expired")),
    );
    let out = in_netns(&script);
    assert!(out.status.success(), "{}", text(&out));
    let read = |name: &str| std::fs::read_to_string(out_of(name)).unwrap();
    let rc = |name: &str| std::fs::read_to_string(format!("{}.rc", out_of(name))).unwrap();
    assert_eq!(rc("good").trim(), "0", "import over TLS: {}", read("good"));
    let statistics: serde_json::Value = serde_json::from_str(&read("statistics")).unwrap();
    assert_eq!(
        statistics["CountInstances"].as_u64().unwrap() as usize,
        files_in(&study).len(),
        "{}",
        read("good")
    );
    assert_ne!(rc("wrong_ca").trim(), "0", "{}", read("wrong_ca"));
    assert!(
        read("wrong_ca").contains(&format!(
            "the PACS at 127.0.0.1:4242: TLS: the PACS's certificate is not trusted: it is \
             not signed by a CA in the CA file inbound.pacs_tls.ca = {}",
            pem(&certs, "other")
        )),
        "{}",
        read("wrong_ca")
    );
    // A plain association to the TLS port; a client certificate from another CA.
    assert_ne!(rc("plain").trim(), "0", "{}", read("plain"));
    assert!(
        read("plain").contains(
            "the PACS at 127.0.0.1:4242: the PACS answered with TLS: its port is a DICOM TLS \
             port; configure [inbound.pacs_tls]"
        ),
        "{}",
        read("plain")
    );
    assert_ne!(rc("stranger").trim(), "0", "{}", read("stranger"));
    assert!(
        !read("stranger").contains("answered with TLS")
            && read("stranger").contains(
                "the PACS at 127.0.0.1:4242: TLS: the PACS does not trust the gateway's \
                 certificate (inbound.pacs_tls.certificate"
            ),
        "{}",
        read("stranger")
    );
    assert_ne!(rc("expired").trim(), "0", "{}", read("expired"));
    assert!(
        read("expired")
            .contains("the PACS at 127.0.0.1:4242: TLS: the PACS's certificate expired on "),
        "{}",
        read("expired")
    );
}

#[test]
fn an_unusable_certificate_or_key_file_is_named_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates_in(dir.path());
    let study = dir.path().join("study");
    gen_ct(&study, 1, &[]);
    let missing = certs.join("missing.pem").display().to_string();
    let (ca, client, client_key, server_key) = (
        pem(&certs, "ca"),
        pem(&certs, "client"),
        key(&certs, "client"),
        key(&certs, "server"),
    );
    let encrypted = certs.join("encrypted.key").display().to_string();
    let cases: [(&[&str], String); 5] = [
        (
            &["--tls-ca", &missing],
            format!("inbound.pacs_tls.ca = {missing}: cannot read the file"),
        ),
        (
            &["--tls-ca", &client_key],
            format!("inbound.pacs_tls.ca = {client_key}: no certificate in the file"),
        ),
        (
            &[
                "--tls-ca",
                &ca,
                "--tls-certificate",
                &client,
                "--tls-key",
                &ca,
            ],
            format!("inbound.pacs_tls.key = {ca}: no private key in the file"),
        ),
        (
            &[
                "--tls-ca",
                &ca,
                "--tls-certificate",
                &client,
                "--tls-key",
                &server_key,
            ],
            format!(
                "inbound.pacs_tls.key = {server_key}: this private key does not match the \
                 certificate in {client}"
            ),
        ),
        (
            &[
                "--tls-ca",
                &ca,
                "--tls-certificate",
                &client,
                "--tls-key",
                &encrypted,
            ],
            format!(
                "inbound.pacs_tls.key = {encrypted}: the private key is encrypted \
                 (-----BEGIN ENCRYPTED PRIVATE KEY-----); the gateway starts without anyone \
                 to type its passphrase: decrypt it, `openssl pkey -in {encrypted} -out \
                 {encrypted}.plain`"
            ),
        ),
    ];
    for (args, expected) in cases {
        let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["import", "--pacs", "127.0.0.1:9", "--called", "PACS"])
            .args(args)
            .arg(&study));
        assert!(!out.status.success(), "{args:?} passed");
        assert!(text(&out).contains(&expected), "{args:?}: {}", text(&out));
    }
    // The daemon does not start with a key that is not its certificate's.
    let config = dir.path().join("cloudpdi.toml");
    let tls_port = free_port();
    let tls = format!(
        "[dicom.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificate = \"{}\"\nkey = \"{client_key}\"\n",
        pem(&certs, "server"),
    );
    std::fs::write(
        &config,
        config_text(
            free_port(),
            free_port(),
            &dir.path().join("data"),
            &format!("{CT_ROUTE}{tls}"),
        ),
    )
    .unwrap();
    let serve = |config_text: String, expected: &str| {
        std::fs::write(&config, config_text).unwrap();
        let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
            .args(["serve", "--config"])
            .arg(&config));
        assert!(!out.status.success(), "serve started: {}", text(&out));
        assert!(text(&out).contains(expected), "{expected}: {}", text(&out));
    };
    serve(
        std::fs::read_to_string(&config).unwrap(),
        &format!(
            "dicom.tls.key = {client_key}: this private key does not match the certificate in {}",
            pem(&certs, "server")
        ),
    );
    // The TLS listener on the plain one's address; a client certificate without its key.
    let dicom = free_port();
    let data = dir.path().join("data");
    let colliding = tls.replace(
        &format!("127.0.0.1:{tls_port}"),
        &format!("127.0.0.1:{dicom}"),
    );
    serve(
        config_text(dicom, free_port(), &data, &format!("{CT_ROUTE}{colliding}")),
        "the plain listener dicom.listen uses this address",
    );
    serve(
        config_text(
            free_port(),
            free_port(),
            &data,
            &format!(
                "{CT_ROUTE}[inbound]\npacs = \"127.0.0.1:104\"\n[inbound.pacs_tls]\nca = \"{ca}\"\n\
                 certificate = \"{client}\"\n"
            ),
        ),
        "inbound.pacs_tls: certificate and key go together",
    );
}

#[test]
fn a_silent_tls_peer_is_dropped_and_a_peer_over_its_limit_is_rejected_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates_in(dir.path());
    let (mut daemon, tls_port) = tls_daemon(
        dir.path(),
        &certs,
        "association_timeout = 5\nmax_associations_per_peer = 1\n",
        "",
    );
    // Says nothing: holds 127.0.0.1's one connection until the association timeout.
    let silent = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    let ca = pem(&certs, "ca");
    let over = dcmtk("/usr/bin/echoscu", tls_port, &["+tla", "+cf", &ca], &[]);
    assert!(!over.status.success(), "a peer over its limit got in");
    assert!(
        text(&over).to_lowercase().contains("local limit exceeded"),
        "the rejection came over TLS: {}",
        text(&over)
    );
    // A flood over the limit: each connection sends a ClientHello. Handshakes for
    // turned-away peers run at most 4 at once; the others are closed without one. How
    // many get one in all depends on how fast the daemon accepts (a handshake it gives up
    // after 1 s frees its place), so what is checked is how many run at the same time.
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let mut connection = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
            std::io::Write::write_all(&mut connection, &client_hello()).unwrap();
            std::thread::spawn(move || handshake_span(connection))
        })
        .collect();
    let spans: Vec<_> = flood
        .into_iter()
        .filter_map(|reader| reader.join().unwrap())
        .collect();
    assert!(
        !spans.is_empty(),
        "no connection over the limit got a TLS handshake"
    );
    let most_at_once = spans
        .iter()
        .map(|(start, end)| {
            let middle = *start + (*end - *start) / 2;
            spans
                .iter()
                .filter(|(s, e)| *s <= middle && middle <= *e)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most_at_once <= 4,
        "{most_at_once} handshakes for peers over the limit ran at once ({} in all)",
        spans.len()
    );
    wait_for(
        "the silent peer dropped",
        std::time::Duration::from_secs(10),
        || {
            daemon
            .log()
            .contains(
                "peer did not complete the TLS handshake and association negotiation within 5 s",
            )
            .then_some(())
        },
    );
    drop(silent);
    assert!(daemon.stop().success());
}

/// When a connection that sent a ClientHello got the server's first handshake record and
/// when the server closed it; `None` when it was closed without a handshake.
fn handshake_span(
    mut connection: std::net::TcpStream,
) -> Option<(std::time::Instant, std::time::Instant)> {
    connection
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 1];
    match std::io::Read::read(&mut connection, &mut head) {
        Ok(1) if head[0] == 0x16 => {}
        _ => return None,
    }
    let start = std::time::Instant::now();
    let mut sink = [0u8; 4096];
    while matches!(std::io::Read::read(&mut connection, &mut sink), Ok(n) if n > 0) {}
    Some((start, std::time::Instant::now()))
}

/// A TLS ClientHello, as rustls sends it.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn with_one_association_slot_in_all_both_listeners_still_accept() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates_in(dir.path());
    let (mut daemon, tls_port) = tls_daemon(
        dir.path(),
        &certs,
        "max_associations = 1\nreserved_associations = 0\n",
        "",
    );
    let ca = pem(&certs, "ca");
    let plain_port = daemon.dicom.port();
    let timeouts = ["-to", "5", "-ta", "5"];
    for (port, tls) in [
        (plain_port, false),
        (plain_port, false),
        (tls_port, true),
        (tls_port, true),
        (plain_port, false),
    ] {
        let mut args = timeouts.to_vec();
        if tls {
            args.extend(["+tla", "+cf", &ca]);
        }
        let echo = dcmtk("/usr/bin/echoscu", port, &args, &[]);
        assert!(
            echo.status.success(),
            "echo to {port} (TLS {tls}): {}",
            text(&echo)
        );
    }
    assert!(daemon.stop().success());
}

#[test]
fn a_plain_import_to_a_pacs_that_closes_at_once_is_not_called_tls() {
    let dir = tempfile::tempdir().unwrap();
    let study = dir.path().join("study");
    gen_ct(&study, 1, &[]);
    let pacs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = pacs.local_addr().unwrap().port();
    std::thread::spawn(move || pacs.incoming().for_each(drop));
    let out = run(Command::new(env!("CARGO_BIN_EXE_cloudpdi"))
        .args(["import", "--pacs", &format!("127.0.0.1:{port}")])
        .args(["--called", "PACS", "--attempts", "1"])
        .arg(&study));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "the connection to the PACS at 127.0.0.1:{port} was lost (no A-ASSOCIATE answer: \
             the PACS closed the connection before answering, or did not answer within 30 s \
             (if the PACS's port speaks DICOM TLS, configure [inbound.pacs_tls])"
        )) && !text(&out).contains("answered with TLS"),
        "{}",
        text(&out)
    );
}
