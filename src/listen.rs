//! Binding the listening sockets (DICOM, admin, embedded repository, repository server),
//! with an error that says what to do for each reason the system gives.
//!
//! "Address in use" means another program has the port; "address not available" means
//! the address is not one of this machine's; "permission denied" on a port below 1024
//! means the process lacks `CAP_NET_BIND_SERVICE`. Each gets its own hint, so that an
//! admin is not sent looking for a program that does not exist.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Ports below this need `CAP_NET_BIND_SERVICE` (Linux's `ip_unprivileged_port_start`
/// default).
const PRIVILEGED_PORTS: u16 = 1024;

/// A listening socket that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}) for {what}: {source}; {}", hint(*.addr, .source))]
pub struct BindError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The configuration key that sets it (`dicom.listen`).
    pub key: &'static str,
    /// What listens there (`DICOM`, `admin`).
    pub what: &'static str,
    /// What the system reported.
    pub source: io::Error,
}

/// Binds `addr`, the value of configuration key `key`, for `what`.
///
/// # Errors
/// [`BindError`] with a hint for the reason.
pub async fn bind(
    addr: SocketAddr,
    key: &'static str,
    what: &'static str,
) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        addr,
        key,
        what,
        source,
    })
}

/// What to do about `error` when binding `addr`.
fn hint(addr: SocketAddr, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::AddrInUse => format!(
            "another program (or another cloudpdi) is using port {}: stop it, or choose \
             another port (`ss -ltnp` shows who listens)",
            addr.port()
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine: use 0.0.0.0 (every address), 127.0.0.1, \
             or one of the addresses `ip -br addr` lists",
            addr.ip()
        ),
        io::ErrorKind::PermissionDenied if addr.port() < PRIVILEGED_PORTS => format!(
            "ports below {PRIVILEGED_PORTS} need the CAP_NET_BIND_SERVICE capability: \
             uncomment AmbientCapabilities=CAP_NET_BIND_SERVICE and \
             CapabilityBoundingSet=CAP_NET_BIND_SERVICE in the systemd unit, or use a port \
             of {PRIVILEGED_PORTS} or above"
        ),
        _ => "check the address in the configuration".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_reason_has_its_own_hint() {
        let taken = bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "dicom.listen",
            "DICOM",
        )
        .await
        .expect("an ephemeral port");
        let addr = taken.local_addr().expect("bound address");
        let in_use = bind(addr, "dicom.listen", "DICOM")
            .await
            .expect_err("port taken")
            .to_string();
        assert!(
            in_use.contains("another program") && in_use.contains("dicom.listen"),
            "{in_use}"
        );
        // 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
        let foreign = bind(
            SocketAddr::from(([192, 0, 2, 1], 0)),
            "admin.listen",
            "admin",
        )
        .await
        .expect_err("not ours")
        .to_string();
        assert!(
            foreign.contains("not an address of this machine")
                && !foreign.contains("another program"),
            "{foreign}"
        );
        let denied = hint(
            SocketAddr::from(([0, 0, 0, 0], 104)),
            &io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(denied.contains("CAP_NET_BIND_SERVICE"), "{denied}");
    }
}
