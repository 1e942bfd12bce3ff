//! Receive: the token field (a USB scanner types the token and Enter; a camera reads the
//! QR where the browser has `BarcodeDetector`), the live check of the token text before
//! anything is queued, the hand-off (the one of `POST /tokens`), and the job page with
//! its progress as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::i18n::{Lang, T, fill};
use super::{Ctx, WebState, html_response, layout, message_page};
use crate::admin::handoff::{Handoff, hand_over};
use crate::gateway::inbound::{InStep, InboundJob};
use crate::gateway::jobs::Pipeline;
use crate::token::text::TextError;
use crate::token::{Token, TokenError};

/// How often the progress stream looks at the job record.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(500);

/// How long one progress stream lasts; it then sends `end` and the page stops following
/// (a forgotten tab does not hold a connection for ever: reloading the page follows again).
pub const EVENT_STREAM_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Progress streams open at once, all sessions together (they hold connections, which
/// [`super::MAX_CONNECTIONS`] bounds for every page); a further one is refused with 429.
pub const MAX_STREAMS: usize = 32;

/// Progress streams one session holds at once (a browser opens about six connections per
/// host: more streams would stall its pages); a further one is refused with 429.
pub const MAX_STREAMS_PER_SESSION: usize = 4;

/// One open progress stream, counted until dropped.
struct StreamSlot {
    streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    session: String,
}

impl StreamSlot {
    /// A slot for a stream of `session`, or `None` beyond the limits.
    fn take(state: &WebState, session: &str) -> Option<StreamSlot> {
        let mut streams = state.streams.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = streams.values().sum();
        let mine = streams.get(session).copied().unwrap_or(0);
        if total >= MAX_STREAMS || mine >= MAX_STREAMS_PER_SESSION {
            return None;
        }
        streams.insert(session.to_owned(), mine + 1);
        Some(StreamSlot {
            streams: state.streams.clone(),
            session: session.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = streams.get_mut(&self.session) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                streams.remove(&self.session);
            }
        }
    }
}

/// Where a progress stream is.
enum Phase {
    /// Following the job; the last view sent.
    Following(Option<View>),
    /// The job ended, the session ended, the daemon stops or the time is up: `end` next.
    Ending,
    /// `end` was sent.
    Over,
}

/// The receive form's fields. The token is wiped when dropped.
#[derive(Deserialize)]
pub(super) struct Receive {
    #[serde(default)]
    token: String,
    #[serde(default)]
    patient_id: String,
}

/// What the live check answers.
#[derive(Serialize)]
pub(super) struct Checked {
    /// The token reads (and has not expired).
    ok: bool,
    /// A mistyped group was found (the script shows this while the text is typed; the
    /// other refusals only once the text is complete).
    group: Option<usize>,
    /// The sentence to show, in the page's language.
    message: String,
}

/// The token text of a live check.
#[derive(Deserialize)]
pub(super) struct CheckBody {
    #[serde(default)]
    token: String,
}

/// The sentence for a token that cannot be used, in `lang`; `None` for a usable one.
fn token_problem(lang: Lang, text: &str) -> Option<(Option<usize>, String)> {
    let token = match Token::from_text(text) {
        Ok(token) => token,
        Err(TokenError::Text(e)) => {
            return Some(match e {
                TextError::Check { group } => (
                    Some(group),
                    fill(T::CheckGroup.get(lang), &[("group", &group.to_string())]),
                ),
                TextError::Prefix => (None, T::CheckPrefix.get(lang).to_owned()),
                TextError::Version1 => (None, T::CheckVersion1.get(lang).to_owned()),
                TextError::BadChar { position } => (
                    None,
                    fill(
                        T::CheckChar.get(lang),
                        &[("position", &position.to_string())],
                    ),
                ),
                TextError::TooLong => (None, T::CheckTooLong.get(lang).to_owned()),
                _ => (None, T::CheckLength.get(lang).to_owned()),
            });
        }
        Err(TokenError::Envelope(_) | TokenError::Field(_)) => {
            return Some((None, T::TokenUnreadable.get(lang).to_owned()));
        }
        Err(TokenError::Version(_)) => return Some((None, T::TokenVersion.get(lang).to_owned())),
        Err(TokenError::Expired(_)) => return Some((None, T::TokenExpired.get(lang).to_owned())),
        Err(e) => return Some((None, e.to_string())),
    };
    match token.check_not_expired(crate::clock::now_seconds()) {
        Ok(()) => None,
        Err(_) => Some((None, T::TokenExpired.get(lang).to_owned())),
    }
}

/// The receive form, with `notice` above it (an error is an alert).
fn form(ctx: &Ctx, state: &WebState, notice: Option<(&str, Option<&str>)>) -> Markup {
    let off = state.admin.inbound.is_none();
    let body = html! {
        @if off {
            p.notice.error role="alert" { (ctx.t(T::NoInbound)) }
        }
        @if let Some((text, detail)) = notice {
            div.notice.error role="alert" id="receive-error" {
                p { (text) }
                @if let Some(detail) = detail { p.detail { (detail) } }
            }
        }
        form id="receive" method="post" action="/receive" data-check="/receive/check" data-csrf=(ctx.csrf()) {
            input type="hidden" name="csrf" value=(ctx.csrf());
            p {
                label for="patient_id" { (ctx.t(T::PatientIdLabel)) }
                span.help id="patient-help" { (ctx.t(T::PatientIdHelp)) }
                input id="patient_id" name="patient_id" type="text" autocomplete="off" maxlength="64"
                    spellcheck="false" disabled[off] aria-describedby="patient-help";
            }
            p {
                label for="token" { (ctx.t(T::TokenLabel)) }
                span.help id="token-help" { (ctx.t(T::TokenHelp)) }
                input id="token" name="token" type="text" autocomplete="off" autocapitalize="characters"
                    spellcheck="false" autofocus required disabled[off]
                    maxlength=(crate::token::text::MAX_TEXT)
                    aria-describedby="token-help token-check";
                span.check id="token-check" role="status" aria-live="polite" {}
            }
            p.buttons {
                button type="submit" disabled[off] { (ctx.t(T::ImportButton)) }
                button id="camera" type="button" hidden data-stop=(ctx.t(T::CameraStop)) data-start=(ctx.t(T::CameraButton)) { (ctx.t(T::CameraButton)) }
            }
            video id="camera-view" hidden muted playsinline aria-hidden="true" {}
        }
    };
    layout(ctx, ctx.t(T::ReceiveTitle), body)
}

/// `GET /receive`.
pub(super) async fn page(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
) -> Response {
    html_response(form(&ctx, &state, None))
}

/// `POST /receive/check` (JSON, CSRF header): the token text's problem, in words.
pub(super) async fn check(
    Extension(ctx): Extension<Ctx>,
    axum::Json(body): axum::Json<CheckBody>,
) -> Response {
    let text = Zeroizing::new(body.token);
    let answer = match token_problem(ctx.lang, &text) {
        None => Checked {
            ok: true,
            group: None,
            message: ctx.t(T::CheckOk).to_owned(),
        },
        Some((group, message)) => Checked {
            ok: false,
            group,
            message,
        },
    };
    axum::Json(answer).into_response()
}

/// `POST /receive`: the token checked again, then handed over as `cloudpdi receive`
/// hands it; a new or known job shows its page.
pub(super) async fn submit(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form_data): axum::Form<Receive>,
) -> Response {
    let token = Zeroizing::new(form_data.token);
    let patient_id = form_data.patient_id.trim().to_owned();
    let refuse = |status: StatusCode, text: &str, detail: Option<&str>| {
        (
            status,
            html_response(form(&ctx, &state, Some((text, detail)))),
        )
            .into_response()
    };
    if let Some((_, problem)) = token_problem(ctx.lang, &token) {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, &problem, None);
    }
    let bad_id = crate::gateway::inbound::reconcile::check_id(&patient_id).is_err();
    if !patient_id.is_empty() && bad_id {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            ctx.t(T::PatientIdBad),
            None,
        );
    }
    let mut text = Zeroizing::new(String::with_capacity(token.len() + patient_id.len() + 16));
    text.push_str(token.trim());
    text.push('\n');
    if !patient_id.is_empty() {
        text.push_str("patient-id: ");
        text.push_str(&patient_id);
        text.push('\n');
    }
    let user = ctx.user();
    match hand_over(&state.admin, &text).await {
        Handoff::Queued(id) => {
            tracing::info!(user = %user, job = %id, "web: token handed over: import queued");
            Redirect::to(&format!("/receive/{id}")).into_response()
        }
        Handoff::Known { id, .. } => {
            tracing::info!(user = %user, job = %id, "web: token handed over again: not imported twice");
            let unapplied = if patient_id.is_empty() {
                ""
            } else {
                "&id_not_applied=1"
            };
            Redirect::to(&format!("/receive/{id}?again=1{unapplied}")).into_response()
        }
        Handoff::NoInbound => refuse(StatusCode::CONFLICT, ctx.t(T::NoInbound), None),
        Handoff::Refused(why) => {
            tracing::info!(user = %user, "web: token refused: {why}");
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                ctx.t(T::Refused),
                Some(&why),
            )
        }
        Handoff::Unavailable(why) => {
            tracing::warn!(user = %user, "web: token not handed over: {why}");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ctx.t(T::Unavailable),
                Some(&why),
            )
        }
    }
}

/// Whether `id` has the form of an inbound job ID (`R` + 12 hex digits).
fn is_inbound_id(id: &str) -> bool {
    id.len() == 13 && id.starts_with('R') && id[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The inbound job `id` (off the runtime); `Err` is the page to answer instead.
async fn inbound_job(state: &WebState, ctx: &Ctx, id: &str) -> Result<InboundJob, Response> {
    let Some(inbound) = state.admin.inbound.clone().filter(|_| is_inbound_id(id)) else {
        return Err(message_page(ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound)));
    };
    let asked = id.to_owned();
    match tokio::task::spawn_blocking(move || inbound.store().get::<InboundJob>(&asked)).await {
        Ok(Ok(Some(job))) => Ok(job),
        Ok(Ok(None)) => Err(message_page(ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound))),
        _ => Err(message_page(
            ctx,
            StatusCode::SERVICE_UNAVAILABLE,
            ctx.t(T::Unavailable),
        )),
    }
}

/// Where a job is, as the page and its events show it.
#[derive(Serialize, PartialEq, Clone)]
struct View {
    /// `running`, `retrying`, `held`, `done` or `failed`.
    state: &'static str,
    /// The step in words.
    step: String,
    /// Instances stored.
    stored: u64,
    /// Instances listed (0 before the PDI is read).
    total: u64,
    /// `{stored} of {total} stored`, in words.
    count: String,
    /// The end state or what is awaited, in words.
    message: String,
    /// The last error, for an administrator.
    detail: String,
    /// The study, once the verified PDI told it: (label, value) pairs.
    study: Vec<(&'static str, String)>,
}

fn view(lang: Lang, job: &InboundJob) -> View {
    let step = match job.step {
        InStep::Download => T::StepDownload,
        InStep::Open => T::StepOpen,
        InStep::Unpack => T::StepUnpack,
        InStep::Import => T::StepImport,
        InStep::Receipt => T::StepReceipt,
        InStep::Done => T::StepDone,
        InStep::Failed => T::StepFailed,
    };
    let (state, message) = match job.step {
        InStep::Done => ("done", T::Done.get(lang).to_owned()),
        InStep::Failed => (
            "failed",
            format!(
                "{} {}",
                T::Failed.get(lang),
                T::of_cause(job.progress.cause).get(lang)
            ),
        ),
        _ if job.progress.held => (
            "held",
            format!(
                "{} {}",
                T::of_cause(job.progress.cause).get(lang),
                T::Held.get(lang)
            ),
        ),
        _ if job.progress.attempts > 0 => (
            "retrying",
            format!(
                "{} {}",
                T::of_cause(job.progress.cause).get(lang),
                T::Retrying.get(lang)
            ),
        ),
        _ => ("running", String::new()),
    };
    View {
        state,
        step: step.get(lang).to_owned(),
        stored: job.stored,
        total: job.instances,
        count: fill(
            T::Stored.get(lang),
            &[
                ("stored", &job.stored.to_string()),
                ("total", &job.instances.to_string()),
            ],
        ),
        message,
        detail: job.progress.last_error.clone().unwrap_or_default(),
        study: job.study.as_ref().map_or_else(Vec::new, |study| {
            [
                (T::PatientId, study.patient_id.clone()),
                (T::Accession, study.accession.clone()),
                (T::StudyDate, super::format_date(&study.study_date)),
                (T::Modality, study.modality.clone()),
            ]
            .into_iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(label, value)| (label.get(lang), value))
            .collect()
        }),
    }
}

/// `?again=1`: the token was handed over again (its job already existed);
/// `&id_not_applied=1`: with a local Patient ID, which its job does not take.
#[derive(Deserialize)]
pub(super) struct Again {
    #[serde(default)]
    again: Option<String>,
    #[serde(default)]
    id_not_applied: Option<String>,
}

/// `GET /receive/{id}`: the job's progress, live while the page is open.
pub(super) async fn job(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
    Query(again): Query<Again>,
) -> Response {
    let job = match inbound_job(&state, &ctx, &id).await {
        Ok(job) => job,
        Err(page) => return page,
    };
    let v = view(ctx.lang, &job);
    let title = fill(ctx.t(T::JobTitle), &[("id", &job.id)]);
    let body = html! {
        @if again.again.is_some() {
            p.notice role="status" {
                @if job.step == InStep::Done { (ctx.t(T::AlreadyImported)) } @else { (ctx.t(T::AlreadyRunning)) }
            }
        }
        @if again.id_not_applied.is_some() {
            p.notice.error role="alert" id="id-not-applied" { (ctx.t(T::PatientIdNotApplied)) }
        }
        section id="job" data-events={ "/jobs/" (job.id) "/events" } data-state=(v.state) {
            dl.study id="job-study" hidden[v.study.is_empty()] {
                @for (label, value) in &v.study { dt { (label) } dd { (value) } }
            }
            dl.progress {
                dt { (ctx.t(T::State)) }
                dd id="job-step" { (v.step) }
                dt { (ctx.t(T::Progress)) }
                dd {
                    progress id="job-bar" max=(v.total.max(1)) value=(v.stored) aria-labelledby="job-count" {}
                    " "
                    span id="job-count" { (v.count) }
                }
            }
            p.notice id="job-message" role="status" aria-live="polite" hidden[v.message.is_empty()] { (v.message) }
            p.detail id="job-detail" hidden[v.detail.is_empty()] { (v.detail) }
            @if !matches!(v.state, "done" | "failed") { p.muted id="job-live" { (ctx.t(T::Live)) } }
        }
        p { a.button href="/receive" { (ctx.t(T::ReceiveAnother)) } }
    };
    html_response(layout(&ctx, &title, body))
}

/// `GET /jobs/{id}/events`: the job's [`View`] as a `progress` event whenever it changes,
/// then `end` (the page stops following: no reconnection) once the job ended, the session
/// ended (logout, removed user, changed password, idle) or [`EVENT_STREAM_LIMIT`] passed.
/// At most [`MAX_STREAMS_PER_SESSION`] per session and [`MAX_STREAMS`] in all: 429 beyond.
pub(super) async fn events(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    if let Err(page) = inbound_job(&state, &ctx, &id).await {
        return page;
    }
    let Some((session_id, session)) = ctx.session.clone() else {
        return message_page(&ctx, StatusCode::FORBIDDEN, ctx.t(T::Forbidden));
    };
    let Some(slot) = StreamSlot::take(&state, &session_id) else {
        tracing::warn!(user = %ctx.user(), job = %id, "web: progress stream refused: {MAX_STREAMS_PER_SESSION} per session or {MAX_STREAMS} in all are open");
        return message_page(
            &ctx,
            StatusCode::TOO_MANY_REQUESTS,
            ctx.t(T::TooManyStreams),
        );
    };
    let started = tokio::time::Instant::now();
    let lang = ctx.lang;
    let stream = futures_util::stream::unfold(
        (state, id, Phase::Following(None), slot),
        move |(state, id, phase, slot)| {
            let (session_id, session) = (session_id.clone(), session.clone());
            async move {
                let last = match phase {
                    Phase::Over => return None,
                    Phase::Ending => return Some(ending(state, id, slot)),
                    Phase::Following(last) => last,
                };
                loop {
                    let inbound = state.admin.inbound.clone()?;
                    let (asked, check) = (id.clone(), state.clone());
                    let user = session.user.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let key = check.users.key(&user);
                        (key, inbound.store().get::<InboundJob>(&asked))
                    })
                    .await;
                    let alive = state
                        .sessions
                        .peek(&session_id, crate::clock::now_ms())
                        .is_some();
                    let (Ok((Some(key), Ok(Some(job)))), true) = (read, alive) else {
                        return Some(ending(state, id, slot));
                    };
                    if !super::session::same_secret(&key, &session.key) {
                        return Some(ending(state, id, slot));
                    }
                    let v = view(lang, &job);
                    if last.as_ref() != Some(&v) {
                        let ended = matches!(v.state, "done" | "failed");
                        let event = Event::default()
                            .event("progress")
                            .json_data(&v)
                            .unwrap_or_else(|_| Event::default().event("progress"));
                        let next = if ended {
                            Phase::Ending
                        } else {
                            Phase::Following(Some(v))
                        };
                        return Some((Ok(event), (state, id, next, slot)));
                    }
                    if started.elapsed() > EVENT_STREAM_LIMIT {
                        return Some(ending(state, id, slot));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(EVENT_INTERVAL) => {}
                        () = state.stop.cancelled() => return Some(ending(state, id, slot)),
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What a progress stream carries from one event to the next.
type StreamState = (Arc<WebState>, String, Phase, StreamSlot);

/// The `end` event, after which the stream closes.
fn ending(
    state: Arc<WebState>,
    id: String,
    slot: StreamSlot,
) -> (Result<Event, Infallible>, StreamState) {
    let end = Event::default().event("end").data("");
    (Ok(end), (state, id, Phase::Over, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_problems_are_named_in_both_languages() {
        let (group, en) = token_problem(Lang::En, "HT2-00000-00001").expect("mistyped");
        assert_eq!(group, Some(2));
        assert_eq!(en, "Check code does not match: group 2 looks mistyped.");
        let (_, ja) = token_problem(Lang::Ja, "HT2-00000-00001").expect("mistyped");
        assert!(ja.contains("2 番目のグループ"), "{ja}");
        let (group, text) = token_problem(Lang::En, "hello").expect("not a token");
        assert_eq!((group, text.as_str()), (None, T::CheckPrefix.get(Lang::En)));
        assert!(is_inbound_id("R0123456789ab"));
        assert!(!is_inbound_id("R0123456789a/"));
        assert!(!is_inbound_id("B000001"));
    }
}
