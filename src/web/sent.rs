//! Sent: the tokens this facility issued, newest first, with route, study, expiry,
//! downloads used and receipts (the repository's answers, as `cloudpdi status` gets
//! them), and the slip to print again (`GET /sent/{id}/slip`: the file the job wrote in
//! its token folder, never a path from the request).
//!
//! Each row's last cell holds its actions: Re-print, Revoke (a confirmation page, then
//! `POST /sent/{id}/revoke`) and Extend (a page with a number of days or a date, then
//! `POST /sent/{id}/extend`), through the one bounded path of `cloudpdi revoke` and
//! `cloudpdi extend` ([`crate::admin::revoke_token`], [`crate::admin::extend_token`]). A
//! revoked token is shown as such, with no action (its slip is not printed).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{Markup, html};
use serde::Deserialize;

use super::i18n::{T, fill, until};
use super::{Ctx, WebState, html_response, layout, message_page, study, study_rows};
use crate::admin::OutboundDetails;
use crate::admin::status::is_job_id;
use crate::gateway::jobs::Pipeline;
use crate::gateway::outbound::{OutboundJob, SlipActionError};
use crate::repository::api::DocumentStatus;
use crate::token::slip::SlipFormat;

/// Largest slip file served: a slip is a few tens of kilobytes (HTML, SVG, PNG or PDF).
pub const MAX_SLIP_BYTES: u64 = 4 * 1024 * 1024;

/// Most days the Extend form accepts (ten years): the repository's own limit
/// (`server.max_expiry_days`, 180 by default) is not known here, so the form lets the
/// repository refuse beyond it and shows its message.
pub const MAX_EXTEND_DAYS: u32 = 3650;

/// Which job was just revoked or extended (`/sent?revoked=ID`, `/sent?extended=ID`).
#[derive(Deserialize)]
pub(super) struct Shown {
    #[serde(default)]
    revoked: Option<String>,
    #[serde(default)]
    extended: Option<String>,
}

/// The answer to a URL naming text that cannot be a job ID: refused before the job store,
/// a log line or the repository sees it.
fn not_a_job(ctx: &Ctx, id: &str) -> Response {
    let text = fill(ctx.t(T::SlipUnknown), &[("id", id)]);
    message_page(ctx, StatusCode::NOT_FOUND, &text)
}

/// Whether the token of `job` may still be revoked or extended: issued, not revoked, not
/// expired.
fn live(job: &OutboundJob, now: u64) -> bool {
    job.token_file.is_some() && job.revoked_at.is_none() && u64::from(job.expires_at) > now
}

/// The study of `job` as its slip printed it: the summary, then the patient's name and the
/// study description when the record kept them (the page is only shown after a login).
fn printed_study(ctx: &Ctx, job: &OutboundJob) -> Markup {
    let printed = job.printed.as_ref();
    let name = printed
        .and_then(|p| p.patient_name.as_deref())
        .filter(|n| !n.is_empty());
    let description = printed
        .and_then(|p| p.study_description.as_deref())
        .filter(|d| !d.is_empty());
    if job.study.is_none() && name.is_none() && description.is_none() {
        return study(ctx, None);
    }
    html! {
        dl.study {
            @if let Some(summary) = &job.study { (study_rows(ctx, summary)) }
            @if let Some(name) = name { dt { (ctx.t(T::PatientName)) } dd { (name) } }
            @if let Some(description) = description { dt { (ctx.t(T::StudyDescription)) } dd { (description) } }
        }
    }
}

/// `GET /sent`, with the notice of a revoke or an extension just made.
pub(super) async fn page(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Query(shown): Query<Shown>,
) -> Response {
    let details = match crate::admin::outbound_details(&state.admin).await {
        Ok(details) => details,
        Err(_) => {
            return message_page(&ctx, StatusCode::SERVICE_UNAVAILABLE, ctx.t(T::Unavailable));
        }
    };
    let outbound = state.admin.outbound.clone();
    let records = match tokio::task::spawn_blocking(move || outbound.records()).await {
        Ok(Ok(records)) => records,
        _ => return message_page(&ctx, StatusCode::SERVICE_UNAVAILABLE, ctx.t(T::Unavailable)),
    };
    let mut issued: Vec<&OutboundJob> = records.iter().filter(|j| j.token_file.is_some()).collect();
    issued.sort_by_key(|j| std::cmp::Reverse(j.progress.created_at));
    let now = crate::clock::now_seconds();
    // A notice only for what the record says: a crafted or old link cannot tell a clerk
    // that a live token was revoked, or that a revoked one was extended.
    let revoked = shown
        .revoked
        .and_then(|id| issued.iter().find(|j| j.id == id).copied())
        .filter(|job| job.revoked_at.is_some())
        .map(|job| job.id.clone());
    let extended = shown
        .extended
        .and_then(|id| issued.iter().find(|j| j.id == id).copied())
        .filter(|job| job.revoked_at.is_none());
    let body = html! {
        @if let Some(id) = &revoked {
            p.notice role="status" { (fill(ctx.t(T::RevokedNotice), &[("id", id)])) }
        }
        @if let Some(job) = extended {
            div.notice role="status" {
                p { (fill(ctx.t(T::ExtendedNotice), &[
                    ("id", &job.id),
                    ("until", &until(ctx.lang, u64::from(job.expires_at), &state.zone)),
                ])) }
                @if job.slip_file.is_some() {
                    p { a.print href={ "/sent/" (job.id) "/slip" } target="_blank" rel="noopener" { (ctx.t(T::PrintNewSlip)) } }
                }
            }
        }
        @if issued.is_empty() {
            p { (ctx.t(T::NoSent)) }
        } @else {
            table.sent {
                thead { tr {
                    th scope="col" { (ctx.t(T::Job)) }
                    th scope="col" { (ctx.t(T::Route)) }
                    th scope="col" { (ctx.t(T::Study)) }
                    th scope="col" { (ctx.t(T::Expiry)) }
                    th scope="col" { (ctx.t(T::Downloads)) }
                    th scope="col" { (ctx.t(T::Receipts)) }
                    th scope="col" { (ctx.t(T::Action)) }
                } }
                tbody {
                    @for job in &issued {
                        @let detail = details.iter().find(|d| d.id == job.id);
                        (row(&ctx, &state, job, detail, now))
                    }
                }
            }
        }
    };
    html_response(layout(&ctx, ctx.t(T::SentTitle), body))
}

/// One issued token's row of the Sent page.
fn row(
    ctx: &Ctx,
    state: &WebState,
    job: &OutboundJob,
    detail: Option<&OutboundDetails>,
    now: u64,
) -> Markup {
    let document = detail.and_then(|d| d.document.as_ref());
    html! {
        tr id={ "sent-" (job.id) } class=[job.revoked_at.map(|_| "revoked")] {
            th scope="row" { (job.id) }
            td { (job.route) }
            td { (printed_study(ctx, job)) }
            td.expiry {
                @if let Some(at) = job.revoked_at {
                    strong.revoked { (fill(ctx.t(T::RevokedAt), &[("time", &crate::clock::local_short(at.saturating_mul(1000), &state.zone))])) }
                } @else {
                    (until(ctx.lang, u64::from(job.expires_at), &state.zone))
                    @if u64::from(job.expires_at) <= now { " " strong { (ctx.t(T::Expired)) } }
                }
            }
            td {
                @match document {
                    Some(d) => { (d.downloads) " / " (d.max_downloads) }
                    None => { span.muted { (ctx.t(T::NotKnown)) } }
                }
            }
            td {
                @match document {
                    Some(d) if d.receipts.is_empty() => { (ctx.t(T::None)) }
                    Some(d) => {
                        ul.receipts {
                            @for r in &d.receipts {
                                li {
                                    (fill(ctx.t(T::ReceiptLine), &[
                                        ("time", &crate::clock::local_short(r.received_at.saturating_mul(1000), &state.zone)),
                                        ("count", &r.receipt.instances_imported.to_string()),
                                    ]))
                                    @if let Some(facility) = &r.receipt.facility { " (" (facility) ")" }
                                }
                            }
                        }
                    }
                    None => { span.muted { (ctx.t(T::NotKnown)) } }
                }
            }
            td.actions {
                @if job.revoked_at.is_none() {
                    @if job.slip_file.is_some() {
                        a.reprint href={ "/sent/" (job.id) "/slip" } target="_blank" rel="noopener" aria-label={ (ctx.t(T::Reprint)) " " (job.id) } { (ctx.t(T::Reprint)) }
                    }
                    @if live(job, now) {
                        a.extend href={ "/sent/" (job.id) "/extend" } aria-label={ (ctx.t(T::Extend)) " " (job.id) } { (ctx.t(T::Extend)) }
                        a.revoke href={ "/sent/" (job.id) "/revoke" } aria-label={ (ctx.t(T::Revoke)) " " (job.id) } { (ctx.t(T::Revoke)) }
                    }
                }
            }
        }
    }
}

/// The issued job `id` and the repository's view of its document (downloads used), or the
/// page to answer instead: not found, or not readable. With `ask`, the repository is asked
/// when its last answer is older than [`crate::admin::DOCUMENT_CACHE`] (as the Sent page
/// does, within [`crate::admin::DOCUMENT_QUERY_TIMEOUT`]); without, only its last answer
/// is shown, so that the page after a revoke or an extension the repository did not
/// answer in time comes at once.
async fn issued(
    state: &Arc<WebState>,
    ctx: &Ctx,
    id: &str,
    ask: bool,
) -> Result<(OutboundJob, Option<DocumentStatus>), Response> {
    let outbound = state.admin.outbound.clone();
    let asked = id.to_owned();
    let job = match tokio::task::spawn_blocking(move || outbound.store().get::<OutboundJob>(&asked))
        .await
    {
        Ok(Ok(Some(job))) if job.token_file.is_some() => job,
        Ok(Ok(_)) => {
            let text = fill(ctx.t(T::SlipUnknown), &[("id", id)]);
            return Err(message_page(ctx, StatusCode::NOT_FOUND, &text));
        }
        _ => {
            return Err(message_page(
                ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                ctx.t(T::Unavailable),
            ));
        }
    };
    let document = if ask {
        crate::admin::outbound_details(&state.admin)
            .await
            .ok()
            .and_then(|details| details.into_iter().find(|d| d.id == job.id))
            .and_then(|d| d.document)
    } else {
        // Not waiting for the cache either: a status request may hold it while it asks.
        state.admin.documents.try_lock().ok().and_then(|cache| {
            let document = job.document_id.as_ref()?;
            cache.get(document)?.1.as_ref().ok().cloned()
        })
    };
    Ok((job, document))
}

/// What the revoke and extend pages show of the token: job, route, study, expiry,
/// downloads used.
fn summary(
    ctx: &Ctx,
    state: &WebState,
    job: &OutboundJob,
    document: Option<&DocumentStatus>,
) -> Markup {
    html! {
        dl.progress {
            dt { (ctx.t(T::Job)) } dd { (job.id) }
            dt { (ctx.t(T::Route)) } dd { (job.route) }
            dt { (ctx.t(T::Study)) } dd { (printed_study(ctx, job)) }
            dt { (ctx.t(T::Expiry)) } dd #expiry { (until(ctx.lang, u64::from(job.expires_at), &state.zone)) }
            dt { (ctx.t(T::Downloads)) }
            dd {
                @match document {
                    Some(d) => { (d.downloads) " / " (d.max_downloads) }
                    None => { span.muted { (ctx.t(T::NotKnown)) } }
                }
            }
        }
    }
}

/// An error notice: `text`, and under *Detail* the message an administrator reads.
fn refusal(ctx: &Ctx, text: &str, detail: Option<&str>) -> Markup {
    html! {
        div.notice.error role="alert" {
            p { (text) }
            @if let Some(detail) = detail {
                details {
                    summary { (ctx.t(T::Detail)) }
                    p.detail { (detail) }
                }
            }
        }
    }
}

/// An outbound step's name (`upload`) in the page's language.
fn step_text(ctx: &Ctx, step: &str) -> String {
    let t = match step {
        "upload" => T::StepUpload,
        "issue" => T::StepIssue,
        "deliver" => T::StepDeliver,
        "post" => T::StepPost,
        "done" => T::StepDone,
        "failed" => T::StepFailed,
        other => return other.to_owned(),
    };
    ctx.t(t).to_owned()
}

/// A refusal of the revoke or extend of job `id` in plain words, with its HTTP status;
/// times in `zone`.
fn refused(
    ctx: &Ctx,
    zone: &jiff::tz::TimeZone,
    id: &str,
    e: &SlipActionError,
) -> (StatusCode, String) {
    let with_id = |t: T| fill(ctx.t(t), &[("id", id)]);
    match e {
        SlipActionError::Unknown(_) => (StatusCode::NOT_FOUND, with_id(T::SlipUnknown)),
        SlipActionError::NotIssued { step, .. } => (
            StatusCode::CONFLICT,
            fill(
                ctx.t(T::SlipNotIssued),
                &[("id", id), ("state", &step_text(ctx, step))],
            ),
        ),
        SlipActionError::Busy { step, .. } => (
            StatusCode::CONFLICT,
            fill(
                ctx.t(T::SlipBusy),
                &[("id", id), ("state", &step_text(ctx, step))],
            ),
        ),
        SlipActionError::Revoked(_) => (StatusCode::CONFLICT, with_id(T::SlipRevoked)),
        SlipActionError::NotLater {
            current_at,
            asked_at,
            ..
        } => (
            StatusCode::CONFLICT,
            fill(
                ctx.t(T::SlipNotLater),
                &[
                    ("current", &until(ctx.lang, u64::from(*current_at), zone)),
                    ("asked", &until(ctx.lang, u64::from(*asked_at), zone)),
                ],
            ),
        ),
        SlipActionError::Refused { message, .. } => (
            StatusCode::CONFLICT,
            fill(ctx.t(T::SlipRefused), &[("message", message)]),
        ),
        SlipActionError::Unreachable { .. } => (
            StatusCode::BAD_GATEWAY,
            ctx.t(T::SlipUnreachable).to_owned(),
        ),
        SlipActionError::Route { .. } => (StatusCode::CONFLICT, ctx.t(T::SlipRoute).to_owned()),
        SlipActionError::Files { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            ctx.t(T::SlipFiles).to_owned(),
        ),
        SlipActionError::TimedOut { seconds, .. } => (
            StatusCode::GATEWAY_TIMEOUT,
            fill(ctx.t(T::SlipTimedOut), &[("seconds", &seconds.to_string())]),
        ),
        SlipActionError::Index(_) | SlipActionError::Worker(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            ctx.t(T::Unavailable).to_owned(),
        ),
    }
}

/// The revoke confirmation page of job `id`, with `notice` (a refusal) above it.
async fn revoke_page(
    state: &Arc<WebState>,
    ctx: &Ctx,
    id: &str,
    status: StatusCode,
    notice: Option<Markup>,
) -> Response {
    // The page after a refusal does not ask the repository again (it may be why).
    let (job, document) = match issued(state, ctx, id, notice.is_none()).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let title = fill(ctx.t(T::RevokeTitle), &[("id", &job.id)]);
    let body = html! {
        @if let Some(notice) = notice { (notice) }
        (summary(ctx, state, &job, document.as_ref()))
        @if job.revoked_at.is_some() {
            p.notice role="status" { (fill(ctx.t(T::AlreadyRevoked), &[("id", &job.id)])) }
            p { a href="/sent" { (ctx.t(T::NavSent)) } }
        } @else {
            p.notice.error { (ctx.t(T::RevokeWarning)) }
            form method="post" action={ "/sent/" (job.id) "/revoke" } {
                input type="hidden" name="csrf" value=(ctx.csrf());
                div.buttons {
                    button.danger type="submit" { (ctx.t(T::RevokeButton)) }
                    // The focus on Cancel: a scanner's Enter (or a stray one) goes back to
                    // the list and revokes nothing.
                    a.button.secondary href="/sent" autofocus { (ctx.t(T::Cancel)) }
                }
            }
        }
    };
    (status, html_response(layout(ctx, &title, body))).into_response()
}

/// `GET /sent/{id}/revoke`: what is about to be revoked, and the button that does it.
pub(super) async fn confirm_revoke(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    if !is_job_id(&id) {
        return not_a_job(&ctx, &id);
    }
    revoke_page(&state, &ctx, &id, StatusCode::OK, None).await
}

/// `POST /sent/{id}/revoke` (CSRF checked by the guard): the token revoked as `cloudpdi
/// revoke` does it, then back to the Sent page with the notice; a refusal on the
/// confirmation page in plain words.
pub(super) async fn revoke(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    if !is_job_id(&id) {
        return not_a_job(&ctx, &id);
    }
    match crate::admin::revoke_token(&state.admin, &id).await {
        Ok(document) => {
            tracing::info!(user = %ctx.user(), job = %id, downloads = document.downloads, "web: token revoked: the repository refuses every later download");
            Redirect::to(&format!("/sent?revoked={id}")).into_response()
        }
        Err(e) => {
            tracing::info!(user = %ctx.user(), job = %id, "web: revoke refused: {e}");
            let (status, text) = refused(&ctx, &state.zone, &id, &e);
            let notice = refusal(&ctx, &text, Some(&e.to_string()));
            revoke_page(&state, &ctx, &id, status, Some(notice)).await
        }
    }
}

/// The Extend form of job `id`, with `notice` (a refusal) above it.
async fn extend_page(
    state: &Arc<WebState>,
    ctx: &Ctx,
    id: &str,
    status: StatusCode,
    notice: Option<Markup>,
) -> Response {
    // The page after a refusal does not ask the repository again (it may be why).
    let (job, document) = match issued(state, ctx, id, notice.is_none()).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let title = fill(ctx.t(T::ExtendTitle), &[("id", &job.id)]);
    let action = format!("/sent/{}/extend", job.id);
    let body = html! {
        @if let Some(notice) = notice { (notice) }
        (summary(ctx, state, &job, document.as_ref()))
        @if job.revoked_at.is_some() {
            p.notice.error role="alert" { (fill(ctx.t(T::SlipRevoked), &[("id", &job.id)])) }
            p { a href="/sent" { (ctx.t(T::NavSent)) } }
        } @else {
            p.help { (ctx.t(T::ExtendHelp)) }
            form.extend method="post" action=(action) {
                input type="hidden" name="csrf" value=(ctx.csrf());
                label for="days" { (ctx.t(T::ExtendDaysLabel)) }
                input #days type="number" name="days" min="1" max=(MAX_EXTEND_DAYS) step="1" inputmode="numeric" required autofocus;
                button type="submit" { (ctx.t(T::ExtendDaysButton)) }
            }
            form.extend method="post" action=(action) {
                input type="hidden" name="csrf" value=(ctx.csrf());
                label for="until" { (ctx.t(T::ExtendUntilLabel)) }
                input #until type="date" name="until" required;
                button type="submit" { (ctx.t(T::ExtendUntilButton)) }
            }
            p { a href="/sent" { (ctx.t(T::Cancel)) } }
        }
    };
    (status, html_response(layout(ctx, &title, body))).into_response()
}

/// `GET /sent/{id}/extend`: the token and the form for its new expiry.
pub(super) async fn extend_form(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    if !is_job_id(&id) {
        return not_a_job(&ctx, &id);
    }
    extend_page(&state, &ctx, &id, StatusCode::OK, None).await
}

/// The Extend form's fields: a number of days from now, or a local date.
#[derive(Deserialize)]
pub(super) struct ExtendForm {
    #[serde(default)]
    days: String,
    #[serde(default)]
    until: String,
}

/// The expiry the Extend form asks for, by the rules of `cloudpdi extend --days` and
/// `--until` (days at most [`MAX_EXTEND_DAYS`]), or the text saying what is wrong.
fn asked_expiry(form: &ExtendForm, zone: &jiff::tz::TimeZone, now: u64) -> Result<u32, T> {
    let (days, until) = (form.days.trim(), form.until.trim());
    match (days.is_empty(), until.is_empty()) {
        (false, true) => {
            let days: u32 = days.parse().map_err(|_| T::ExtendDaysBad)?;
            if !(1..=MAX_EXTEND_DAYS).contains(&days) {
                return Err(T::ExtendDaysBad);
            }
            crate::admin::status::days_from_now(now, days).map_err(|_| T::ExtendDaysBad)
        }
        (true, false) => {
            crate::admin::status::end_of_day(until, zone).map_err(|_| T::ExtendDateBad)
        }
        _ => Err(T::ExtendNothing),
    }
}

/// `POST /sent/{id}/extend` (CSRF checked by the guard): the token re-issued with the new
/// expiry as `cloudpdi extend` does it, then back to the Sent page with the new expiry
/// and the link to print the new slip; a refusal (the repository's limit among them) on
/// the form in plain words.
pub(super) async fn extend(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
    Form(form): Form<ExtendForm>,
) -> Response {
    if !is_job_id(&id) {
        return not_a_job(&ctx, &id);
    }
    let expires_at = match asked_expiry(&form, &state.zone, crate::clock::now_seconds()) {
        Ok(at) => at,
        Err(t) => {
            let notice = refusal(&ctx, ctx.t(t), None);
            return extend_page(
                &state,
                &ctx,
                &id,
                StatusCode::UNPROCESSABLE_ENTITY,
                Some(notice),
            )
            .await;
        }
    };
    match crate::admin::extend_token(&state.admin, &id, expires_at).await {
        Ok(slip) => {
            tracing::info!(user = %ctx.user(), job = %id, expires_at = slip.expires_at, "web: token extended: print the new slip");
            Redirect::to(&format!("/sent?extended={id}")).into_response()
        }
        Err(e) => {
            tracing::info!(user = %ctx.user(), job = %id, "web: extend refused: {e}");
            let (status, text) = refused(&ctx, &state.zone, &id, &e);
            let notice = refusal(&ctx, &text, Some(&e.to_string()));
            extend_page(&state, &ctx, &id, status, Some(notice)).await
        }
    }
}

/// What `GET /sent/{id}/slip` found.
enum Slip {
    /// No such job, or no slip.
    Missing,
    /// The token was revoked: its slip is not printed.
    Revoked,
    /// The slip's format (by its name) and bytes.
    Found(Option<SlipFormat>, Vec<u8>),
}

/// `GET /sent/{id}/slip`: the job's slip file as it was written, for printing again: only
/// from the route's token folder, never through a symbolic link, at most
/// [`MAX_SLIP_BYTES`]; shown sandboxed (no script, no form, no own origin). A revoked
/// token's slip is refused with a message.
pub(super) async fn slip(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    if !is_job_id(&id) {
        return not_a_job(&ctx, &id);
    }
    let outbound = state.admin.outbound.clone();
    let asked = id.clone();
    let read = tokio::task::spawn_blocking(move || {
        let Some(job) = outbound.store().get::<OutboundJob>(&asked).ok().flatten() else {
            return Ok(Slip::Missing);
        };
        if job.revoked_at.is_some() {
            return Ok(Slip::Revoked);
        }
        let Some(path) = job.slip_file.clone() else {
            return Ok(Slip::Missing);
        };
        // Only a file in the route's token folder, not through a symbolic link, at most
        // MAX_SLIP_BYTES read whatever its size says.
        outbound
            .check_sent(&job)
            .map_err(|why| std::io::Error::other(format!("job {}: {why}", job.id)))?;
        let format = SlipFormat::from_path(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)?;
        let meta = file.metadata()?;
        let too_large = || {
            std::io::Error::other(format!(
                "{} is larger than {MAX_SLIP_BYTES} bytes",
                path.display()
            ))
        };
        if !meta.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if meta.len() > MAX_SLIP_BYTES {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        file.take(MAX_SLIP_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_SLIP_BYTES {
            return Err(too_large());
        }
        Ok(Slip::Found(format, bytes))
    })
    .await;
    let (format, bytes) = match read {
        Ok(Ok(Slip::Found(format, bytes))) => (format, bytes),
        Ok(Ok(Slip::Missing)) => {
            return message_page(&ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound));
        }
        Ok(Ok(Slip::Revoked)) => {
            tracing::info!(user = %ctx.user(), job = %id, "web: slip not re-printed: the token was revoked");
            let text = fill(ctx.t(T::ReprintRevoked), &[("id", &id)]);
            return message_page(&ctx, StatusCode::CONFLICT, &text);
        }
        Ok(Err(e)) => {
            tracing::warn!(user = %ctx.user(), job = %id, "web: slip cannot be read: {e}");
            return message_page(&ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound));
        }
        Err(_) => {
            return message_page(&ctx, StatusCode::SERVICE_UNAVAILABLE, ctx.t(T::Unavailable));
        }
    };
    tracing::info!(user = %ctx.user(), job = %id, "web: slip re-printed");
    let content_type = match format {
        Some(SlipFormat::Pdf) => "application/pdf",
        Some(SlipFormat::Png) => "image/png",
        Some(SlipFormat::Svg) => "image/svg+xml",
        _ => "text/html; charset=utf-8",
    };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The slip carries its own style and the QR code inline, and nothing else.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'; \
             sandbox",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(days: &str, until: &str) -> ExtendForm {
        ExtendForm {
            days: days.to_owned(),
            until: until.to_owned(),
        }
    }

    #[test]
    fn the_extend_form_takes_days_up_to_its_bound_or_a_date() {
        let tokyo = crate::clock::time_zone("Asia/Tokyo").expect("zone");
        let now = 1_000;
        let days = |d: &str| asked_expiry(&form(d, ""), &tokyo, now);
        assert_eq!(days("1"), Ok(1_000 + 86_400));
        assert_eq!(days(" 3650 "), Ok(1_000 + 3650 * 86_400));
        for wrong in ["0", "3651", "-1", "1.5", "x", "99999999999"] {
            assert_eq!(days(wrong), Err(T::ExtendDaysBad), "{wrong}");
        }
        // The end of that day in facility.time_zone, as `cloudpdi extend --until`.
        assert_eq!(
            asked_expiry(&form("", "2026-12-31"), &tokyo, now),
            Ok(1_798_729_199)
        );
        assert_eq!(
            asked_expiry(&form("", "31.12.2026"), &tokyo, now),
            Err(T::ExtendDateBad)
        );
        for neither_or_both in [form("", ""), form("3", "2026-12-31")] {
            assert_eq!(
                asked_expiry(&neither_or_both, &tokyo, now),
                Err(T::ExtendNothing)
            );
        }
    }
}
