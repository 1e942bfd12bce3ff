//! `cloudpdi status`, `cloudpdi retry`, `cloudpdi revoke` and `cloudpdi extend`: ask the
//! running daemon's admin endpoint what it holds, to run a failed job again, or to revoke
//! or extend an issued token.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::Path;

use crate::admin::{OutboundDetails, Status};
use crate::clock::now_ms;
use crate::telemetry::{Escaped, escape};

/// Why the status could not be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// The daemon did not answer.
    #[error(
        "no answer from the cloudpdi daemon's admin endpoint at {addr}: {source} (is `cloudpdi serve` running with this configuration?)"
    )]
    Unreachable {
        /// The admin address.
        addr: SocketAddr,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// The configuration naming the admin address cannot be read.
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    /// The text given is not a job ID.
    #[error("{0:?} is not a job ID: `cloudpdi status` lists them (e.g. B000042)")]
    NotAJob(String),
    /// The text given is not a batch ID.
    #[error("{0:?} is not a batch ID: `cloudpdi status` lists them (e.g. B000042)")]
    NotABatch(String),
    /// The daemon declined the retry; its sentence says why.
    #[error("{0}")]
    Declined(String),
    /// The expiry asked for cannot be a token's.
    #[error("{0}")]
    Expiry(String),
}

/// The expiry `cloudpdi extend` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewExpiry {
    /// This many days from now.
    Days(u32),
    /// The end of this local date (`YYYY-MM-DD`) in `facility.time_zone`.
    Until(String),
}

/// Asks the daemon to revoke the token of job `id` (`cloudpdi revoke`); returns its
/// answer.
///
/// # Errors
/// [`StatusError::NotAJob`] for text that cannot be a job ID (checked before anything is
/// sent), [`StatusError::Config`], [`StatusError::Unreachable`],
/// [`StatusError::Declined`] with the daemon's reason (unknown job, no token yet, the
/// repository's refusal).
pub async fn revoke(
    admin: Option<SocketAddr>,
    config: &Path,
    id: &str,
) -> Result<String, StatusError> {
    check_job_id(id)?;
    let addr = admin_address(admin, config)?;
    post(addr, &format!("/jobs/{id}/revoke"), None).await
}

/// Asks the daemon to re-issue the token of job `id` with a later expiry (`cloudpdi
/// extend`); returns its answer (the new expiry, the slip to print). A date is read in
/// `facility.time_zone` of the configuration at `config`.
///
/// # Errors
/// [`StatusError::NotAJob`], [`StatusError::Expiry`] for an expiry that cannot be one
/// (checked before anything is sent), [`StatusError::Config`],
/// [`StatusError::Unreachable`], [`StatusError::Declined`] with the daemon's reason.
pub async fn extend(
    admin: Option<SocketAddr>,
    config: &Path,
    id: &str,
    expiry: &NewExpiry,
) -> Result<String, StatusError> {
    check_job_id(id)?;
    let expires_at = match expiry {
        NewExpiry::Days(days) => days_from_now(crate::clock::now_seconds(), *days)?,
        NewExpiry::Until(date) => {
            let zone_name = crate::config::Config::load(config)?.facility.time_zone;
            let zone = crate::clock::time_zone(&zone_name)
                .map_err(|e| StatusError::Expiry(format!("facility.time_zone: {e}")))?;
            end_of_day(date, &zone)?
        }
    };
    let addr = admin_address(admin, config)?;
    let body = serde_json::to_vec(&crate::admin::ExtendRequest { expires_at })
        .map_err(|e| StatusError::Expiry(e.to_string()))?;
    post(
        addr,
        &format!("/jobs/{id}/extend"),
        Some(("application/json", body)),
    )
    .await
}

/// Refuses text that cannot be a job ID before anything is read or sent.
fn check_job_id(id: &str) -> Result<(), StatusError> {
    if !is_job_id(id) {
        return Err(StatusError::NotAJob(id.to_owned()));
    }
    Ok(())
}

/// Whether `id` can be a job ID (`B000042`, `R1a2b3c4d5e6f`): letters, digits and `-`, at
/// most 64. Text from a URL or a command line is checked before it reaches the job store,
/// a log line or a page.
pub(crate) fn is_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `now` plus `days` days, as a token's expiry (Unix seconds that fit 32 bits): the one
/// rule for `cloudpdi extend --days` and the web page's Extend form.
pub(crate) fn days_from_now(now: u64, days: u32) -> Result<u32, StatusError> {
    if days == 0 {
        return Err(StatusError::Expiry(
            "--days must be at least 1: the expiry can only be extended".into(),
        ));
    }
    now.checked_add(u64::from(days).saturating_mul(86_400))
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| StatusError::Expiry(format!("--days {days} is beyond any token's expiry")))
}

/// The last second of local date `date` (`YYYY-MM-DD`) in `zone`, as a token's expiry: the
/// one rule for `cloudpdi extend --until` and the web page's Extend form.
pub(crate) fn end_of_day(date: &str, zone: &jiff::tz::TimeZone) -> Result<u32, StatusError> {
    let wrong = || {
        StatusError::Expiry(format!(
            "--until {:?} is not a date: write it as YYYY-MM-DD, e.g. 2026-12-31",
            Escaped(date)
        ))
    };
    let day: jiff::civil::Date = date.parse().map_err(|_| wrong())?;
    if date.len() != 10 {
        return Err(wrong());
    }
    let end = zone
        .to_timestamp(day.at(23, 59, 59, 0))
        .map_err(|_| wrong())?
        .as_second();
    u32::try_from(end)
        .map_err(|_| StatusError::Expiry(format!("--until {date} is beyond any token's expiry")))
}

impl From<crate::config::ConfigError> for StatusError {
    /// Boxed: a configuration error is large and rare.
    fn from(e: crate::config::ConfigError) -> Self {
        StatusError::Config(Box::new(e))
    }
}

/// The admin endpoint: `given`, else `admin.listen` of the configuration at `config`.
///
/// # Errors
/// [`StatusError::Config`] when the configuration is needed and cannot be read.
pub fn admin_address(given: Option<SocketAddr>, config: &Path) -> Result<SocketAddr, StatusError> {
    Ok(match given {
        Some(addr) => addr,
        None => crate::config::Config::load(config)?.admin.listen,
    })
}

/// Fetches the status from the admin endpoint at `addr`.
///
/// # Errors
/// [`StatusError::Unreachable`] when the daemon does not answer.
pub async fn fetch(addr: SocketAddr) -> Result<Status, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    admin_client()
        .map_err(unreachable)?
        .get(format!("http://{addr}/status"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)
}

/// How long the commands wait for the loopback admin endpoint: it answers within this
/// (actions that wait on the repository are bounded below it, see
/// [`SLIP_ACTION_TIMEOUT`](super::SLIP_ACTION_TIMEOUT)), or the daemon is not running.
pub const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client for the loopback admin endpoint, which answers at once or not at all.
fn admin_client() -> reqwest::Result<reqwest::Client> {
    crate::repository::tls::install_crypto_provider();
    reqwest::Client::builder().timeout(ADMIN_TIMEOUT).build()
}

/// Asks the daemon to run failed job `id` again; returns its answer (a sentence for the
/// admin). The daemon is at `admin`, else where the configuration at `config` says.
///
/// # Errors
/// [`StatusError::NotAJob`] for text that cannot be a job ID (checked before anything is
/// read or sent), [`StatusError::Config`], [`StatusError::Unreachable`] when the daemon
/// does not answer, [`StatusError::Declined`] with the daemon's reason.
pub async fn retry(
    admin: Option<SocketAddr>,
    config: &Path,
    id: &str,
) -> Result<String, StatusError> {
    check_job_id(id)?;
    let addr = admin_address(admin, config)?;
    post(addr, &format!("/jobs/{id}/retry"), None).await
}

/// Asks the daemon to release held batch `id` (`cloudpdi release`): it is packed and
/// sent as it is (discarded if it holds no instance); returns the daemon's answer.
///
/// # Errors
/// [`StatusError::NotABatch`] for text that cannot be a batch ID (checked before anything
/// is sent), [`StatusError::Config`], [`StatusError::Unreachable`],
/// [`StatusError::Declined`] with the daemon's reason (not held, unknown).
pub async fn release(
    admin: Option<SocketAddr>,
    config: &Path,
    id: &str,
) -> Result<String, StatusError> {
    let digits = id.strip_prefix(['B', 'b']).unwrap_or_default();
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StatusError::NotABatch(id.to_owned()));
    }
    let addr = admin_address(admin, config)?;
    post(addr, &format!("/batches/{id}/release"), None).await
}

/// Posts a request to the admin endpoint at `addr` (with [`crate::admin::ADMIN_HEADER`])
/// and returns the daemon's answer, a sentence for the person at the terminal; `body` is
/// the content type and bytes to send, if any.
///
/// # Errors
/// [`StatusError::Unreachable`] when the daemon does not answer, [`StatusError::Declined`]
/// with the daemon's reason when it refuses.
pub(crate) async fn post(
    addr: SocketAddr,
    path: &str,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<String, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    let mut request = admin_client()
        .map_err(unreachable)?
        .post(format!("http://{addr}{path}"))
        .header(crate::admin::ADMIN_HEADER, "1");
    if let Some((content_type, bytes)) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes);
    }
    let response = request.send().await.map_err(unreachable)?;
    let accepted = response.status().is_success();
    let answer = response.text().await.map_err(unreachable)?;
    let answer = Escaped(answer.trim_end()).to_string();
    if accepted {
        Ok(answer)
    } else {
        Err(StatusError::Declined(answer))
    }
}

/// Renders the status as a table for a person at a terminal: batches and jobs by
/// patient, accession, study date and modality, times in local time.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let times = Times {
        now: now_ms(),
        zone: crate::clock::time_zone(&status.time_zone)
            .or_else(|_| crate::clock::time_zone(""))
            .unwrap_or(jiff::tz::TimeZone::UTC),
    };
    let _ = writeln!(
        out,
        "cloudpdi {} up {} s, {} association(s) open",
        status.version, status.uptime_seconds, status.associations_active
    );
    for route in &status.routes {
        let _ = writeln!(
            out,
            "route {:<12} AE {:<16} stable after {} s",
            escape(&route.name),
            escape(&route.ae_title),
            route.stable_after
        );
    }
    render_jobs(&mut out, status, &times);
    render_refused(&mut out, status, &times);
    if status.batches.is_empty() {
        out.push_str("no batches\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<9} {:<8} {:<6} {:>9} {:<16} {:<16} {:<10} {:<8} {:<16}  STUDY",
        "BATCH",
        "ROUTE",
        "STATE",
        "INSTANCES",
        "PATIENT",
        "ACCESSION",
        "DATE",
        "MODALITY",
        "LAST INSTANCE"
    );
    for view in &status.batches {
        let batch = &view.record;
        let study = &batch.study;
        let _ = writeln!(
            out,
            "{:<9} {:<8} {:<6} {:>9} {:<16} {:<16} {:<10} {:<8} {:<16}  {}",
            batch.id.to_string(),
            escape(&batch.route),
            escape(&view.display_state),
            batch.instances,
            escape(or_dash(&study.patient_id)),
            escape(or_dash(&study.accession)),
            study_date(&study.study_date),
            escape(or_dash(&study.modality)),
            times.at(batch.last_instance_at),
            Escaped(&short_uid(&batch.key))
        );
        if batch.held() {
            let _ = writeln!(
                out,
                "{:<9} possibly incomplete: {} instance(s) refused, the last at {} ({}): held \
                 until the PACS resends them; if it will not, send as it is with: cloudpdi \
                 release {}",
                "",
                batch.refused,
                times.at(batch.last_refused_at.unwrap_or_default()),
                Escaped(batch.refusal.as_deref().unwrap_or("no reason recorded")),
                batch.id
            );
        } else if batch.refused > 0 {
            let how = if batch.released_at.is_some() {
                "released by an admin"
            } else {
                "resent since"
            };
            let _ = writeln!(
                out,
                "{:<9} {} instance(s) refused earlier ({how})",
                "", batch.refused
            );
        }
    }
    out
}

/// `-` for an empty value.
fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

/// A DICOM date `YYYYMMDD` as `YYYY-MM-DD` (other text as it is, escaped).
fn study_date(date: &str) -> String {
    match (date.get(..4), date.get(4..6), date.get(6..8)) {
        (Some(y), Some(m), Some(d))
            if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{y}-{m}-{d}")
        }
        _ => escape(or_dash(date)).to_string(),
    }
}

/// A long UID shortened to its last 16 characters (the distinctive end), with `…`.
fn short_uid(uid: &str) -> String {
    let count = uid.chars().count();
    if count <= 20 {
        return uid.to_owned();
    }
    let tail: String = uid.chars().skip(count - 16).collect();
    format!("…{tail}")
}

/// Record times (Unix milliseconds) as a person reads them: in the daemon's zone
/// (`facility.time_zone`, else this machine's), and relative to now.
struct Times {
    now: u64,
    zone: jiff::tz::TimeZone,
}

impl Times {
    /// `2026-11-29 17:37`.
    fn at(&self, unix_ms: u64) -> String {
        crate::clock::local_short(unix_ms, &self.zone)
    }

    /// `in 2 min`, `5 s ago`.
    fn relative(&self, unix_ms: u64) -> String {
        crate::clock::relative(unix_ms, self.now)
    }
}

fn render_jobs(out: &mut String, status: &Status, times: &Times) {
    if status.jobs.is_empty() {
        out.push_str("no jobs\n");
        return;
    }
    let _ = writeln!(
        out,
        "{:<18} {:<8} {:<8} {:<16}  PROGRESS / LAST ERROR",
        "JOB", "SIDE", "STATE", "CREATED"
    );
    for job in &status.jobs {
        let b = &job.bookkeeping;
        let _ = writeln!(
            out,
            "{:<18} {:<8} {:<8} {:<16}  {}{}",
            escape(&job.id),
            job.direction,
            escape(&job.state),
            times.at(b.created_at),
            Escaped(&job.progress),
            b.last_error
                .as_deref()
                .map(|e| format!(" | attempt {}: {}", b.attempts, Escaped(e)))
                .unwrap_or_default()
        );
        if let Some(study) = &job.study {
            let _ = writeln!(
                out,
                "{:<18} patient {}  accession {}  study date {}  modality {}",
                "",
                escape(or_dash(&study.patient_id)),
                escape(or_dash(&study.accession)),
                study_date(&study.study_date),
                escape(or_dash(&study.modality))
            );
        }
        if let Some(details) = status.outbound.iter().find(|d| d.id == job.id) {
            render_outbound(out, details, times);
        }
        for note in &job.notes {
            let _ = writeln!(out, "{:<18} {}", "", Escaped(note));
        }
        if b.held {
            let _ = writeln!(
                out,
                "{:<18} held: no further attempt; fix the cause, then: cloudpdi retry {}",
                "",
                Escaped(&job.id)
            );
        } else if b.last_error.is_some() && job.state != "failed" && job.state != "done" {
            let _ = writeln!(
                out,
                "{:<18} next attempt {} ({})",
                "",
                times.at(b.retry_at),
                times.relative(b.retry_at)
            );
        }
        if job.state == "failed" {
            let hint = if job.direction == "outbound" {
                format!("fix the cause, then: cloudpdi retry {}", Escaped(&job.id))
            } else {
                "fix the cause, then drop the token into the watch folder again".to_owned()
            };
            let _ = writeln!(out, "{:<18} {hint}", "");
        }
    }
}

/// The lines of an outbound job's details: token file, downloads and receipts.
fn render_outbound(out: &mut String, details: &OutboundDetails, times: &Times) {
    let pad = "";
    if let Some(token) = &details.token_file {
        let _ = writeln!(
            out,
            "{pad:<18} token {}",
            Escaped(&token.display().to_string())
        );
    }
    if let Some(slip) = &details.slip_file {
        let _ = writeln!(
            out,
            "{pad:<18} slip {}",
            Escaped(&slip.display().to_string())
        );
    }
    if details.expires_at > 0 {
        let expires = u64::from(details.expires_at).saturating_mul(1000);
        let _ = writeln!(
            out,
            "{pad:<18} expires {} ({})",
            times.at(expires),
            times.relative(expires)
        );
    }
    if let Some(revoked_at) = details.revoked_at {
        let _ = writeln!(
            out,
            "{pad:<18} revoked {}: the repository refuses every download",
            times.at(revoked_at.saturating_mul(1000))
        );
    }
    if let Some(document) = &details.document {
        let _ = writeln!(
            out,
            "{pad:<18} downloads {} of {} (as of {})",
            document.downloads,
            document.max_downloads,
            times.at(details.checked_at)
        );
        for receipt in &document.receipts {
            let _ = writeln!(
                out,
                "{pad:<18} receipt {}: {} instance(s) imported, {} refused{}",
                times.at(receipt.received_at.saturating_mul(1000)),
                receipt.receipt.instances_imported,
                receipt.receipt.instances_refused,
                if receipt.receipt.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", Escaped(&receipt.receipt.note))
                }
            );
        }
        if document.receipts.is_empty() {
            let _ = writeln!(out, "{pad:<18} no receipt yet");
        }
    } else if let Some(why) = &details.document_error {
        let _ = writeln!(
            out,
            "{pad:<18} downloads and receipts unknown: {}",
            Escaped(why)
        );
    }
    for delivery in &details.deliveries {
        let _ = writeln!(out, "{pad:<18} {}", delivery_line(details, delivery, times));
    }
}

/// One receiving facility of a sealed delivery: posted or why not, then imported (the
/// receipt whose `facility` is the recipient) or not yet.
fn delivery_line(
    details: &OutboundDetails,
    delivery: &crate::gateway::outbound::Delivery,
    times: &Times,
) -> String {
    let to = escape(&delivery.recipient);
    let Some(posted_at) = delivery.posted_at else {
        return format!(
            "not delivered to {to}: {}",
            Escaped(delivery.error.as_deref().unwrap_or("waiting"))
        );
    };
    let imported = details.document.as_ref().and_then(|document| {
        document
            .receipts
            .iter()
            .find(|r| r.receipt.facility.as_deref() == Some(delivery.recipient.as_str()))
    });
    match imported {
        Some(receipt) => format!(
            "delivered to {to} {} (sealed); imported by {to} {}: {} instance(s), {} refused",
            times.at(posted_at),
            times.at(receipt.received_at.saturating_mul(1000)),
            receipt.receipt.instances_imported,
            receipt.receipt.instances_refused
        ),
        None => format!(
            "delivered to {to} {} (sealed); not imported by {to} yet",
            times.at(posted_at)
        ),
    }
}

/// The facilities whose sealed tokens were refused, with the last reason.
fn render_refused(out: &mut String, status: &Status, times: &Times) {
    for refusal in &status.refused_senders {
        let _ = writeln!(
            out,
            "refused sealed tokens from {}: {} message(s), the last {}: {}",
            escape(&refusal.sender),
            refusal.messages,
            times.at(refusal.last_at),
            Escaped(&refusal.reason)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_in_days_is_checked() {
        assert_eq!(days_from_now(1_000, 2).ok(), Some(1_000 + 2 * 86_400));
        assert!(matches!(
            days_from_now(1_000, 0),
            Err(StatusError::Expiry(_))
        ));
        assert!(matches!(
            days_from_now(u64::from(u32::MAX) - 10, 1),
            Err(StatusError::Expiry(_))
        ));
    }

    #[test]
    fn a_date_is_the_end_of_that_local_day() {
        let tokyo = crate::clock::time_zone("Asia/Tokyo").expect("zone");
        // 2026-12-31 23:59:59 JST is 14:59:59 UTC.
        assert_eq!(end_of_day("2026-12-31", &tokyo).ok(), Some(1_798_729_199));
        for wrong in ["2026-13-01", "31.12.2026", "2026-1-5", "", "2026-12-31x"] {
            let refused = end_of_day(wrong, &tokyo).expect_err(wrong);
            assert!(refused.to_string().contains("YYYY-MM-DD"), "{refused}");
        }
    }
}
