//! Jobs: the failed and held jobs of both pipelines, each with the reason in plain words
//! (from its [`crate::gateway::jobs::Cause`], in the page's language), the detail an
//! administrator reads, and a Retry button (the retry of `cloudpdi retry`).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::i18n::{T, fill};
use super::{Ctx, WebState, html_response, layout, study};
use crate::gateway::inbound::{InStep, InboundJob};
use crate::gateway::jobs::{Progress, RetryError};
use crate::gateway::outbound::OutStep;
use crate::gateway::reception::batch::StudySummary;

/// A job that needs a person.
struct Stuck {
    id: String,
    outbound: bool,
    study: Option<StudySummary>,
    progress: Progress,
}

/// The failed and held jobs of both pipelines, most recent first (blocking).
fn stuck(state: &WebState) -> Result<Vec<Stuck>, crate::gateway::store::IndexError> {
    use crate::gateway::jobs::Pipeline;
    let needs_person = |failed: bool, p: &Progress| failed || p.held;
    let mut all: Vec<Stuck> = state
        .admin
        .outbound
        .records()?
        .into_iter()
        .filter(|j| needs_person(j.step == OutStep::Failed, &j.progress))
        .map(|j| Stuck {
            id: j.id,
            outbound: true,
            study: j.study,
            progress: j.progress,
        })
        .collect();
    if let Some(inbound) = &state.admin.inbound {
        all.extend(
            inbound
                .store()
                .all::<InboundJob>()?
                .into_iter()
                .filter(|j| needs_person(j.step == InStep::Failed, &j.progress))
                .map(|j| Stuck {
                    id: j.id,
                    outbound: false,
                    study: j.study,
                    progress: j.progress,
                }),
        );
    }
    all.sort_by_key(|j| std::cmp::Reverse(j.progress.updated_at));
    Ok(all)
}

/// Which job was just retried.
#[derive(Deserialize)]
pub(super) struct Shown {
    #[serde(default)]
    retried: Option<String>,
}

/// The jobs page with `notice` (an error when `alert`).
async fn render(
    state: Arc<WebState>,
    ctx: &Ctx,
    status: StatusCode,
    notice: Option<(String, bool)>,
) -> Response {
    let read = state.clone();
    let jobs = match tokio::task::spawn_blocking(move || stuck(&read)).await {
        Ok(Ok(jobs)) => jobs,
        _ => {
            return super::message_page(
                ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                ctx.t(T::Unavailable),
            );
        }
    };
    let body = html! {
        @if let Some((text, alert)) = &notice {
            @if *alert { p.notice.error role="alert" { (text) } } @else { p.notice role="status" { (text) } }
        }
        @if jobs.is_empty() {
            p { (ctx.t(T::NoJobs)) }
        } @else {
            table.jobs {
                thead { tr {
                    th scope="col" { (ctx.t(T::Job)) }
                    th scope="col" { (ctx.t(T::Direction)) }
                    th scope="col" { (ctx.t(T::Study)) }
                    th scope="col" { (ctx.t(T::Reason)) }
                    th scope="col" { (ctx.t(T::Action)) }
                } }
                tbody {
                    @for job in &jobs {
                        tr {
                            th scope="row" { (job.id) }
                            td { (ctx.t(if job.outbound { T::Outbound } else { T::Inbound })) }
                            td { (study(ctx, job.study.as_ref())) }
                            td {
                                p.reason { (ctx.t(T::of_cause(job.progress.cause))) }
                                @if job.progress.held { p.muted { (ctx.t(T::Held)) } }
                                details {
                                    summary { (ctx.t(T::Detail)) }
                                    p.detail { (job.progress.last_error.as_deref().unwrap_or_default()) }
                                }
                            }
                            td {
                                form method="post" action={ "/jobs/" (job.id) "/retry" } {
                                    input type="hidden" name="csrf" value=(ctx.csrf());
                                    button type="submit" aria-label={ (ctx.t(T::Retry)) " " (job.id) } { (ctx.t(T::Retry)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    (
        status,
        html_response(layout(ctx, ctx.t(T::JobsTitle), body)),
    )
        .into_response()
}

/// `GET /jobs`.
pub(super) async fn page(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Query(shown): Query<Shown>,
) -> Response {
    let notice = shown
        .retried
        .filter(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .map(|id| (fill(ctx.t(T::Retried), &[("id", &id)]), false));
    render(state, &ctx, StatusCode::OK, notice).await
}

/// `POST /jobs/{id}/retry` (CSRF checked by the guard): the job back to work.
pub(super) async fn retry(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    let answer = crate::admin::retry_job(&state.admin, &id).await;
    let user = ctx.user();
    match answer {
        Ok(Ok(step)) => {
            tracing::info!(user = %user, job = %id, step = %step, "web: job retried");
            Redirect::to(&format!("/jobs?retried={id}")).into_response()
        }
        Ok(Err(e)) => {
            let status = match e {
                RetryError::Unknown(_) => StatusCode::NOT_FOUND,
                RetryError::Index(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CONFLICT,
            };
            tracing::info!(user = %user, job = %id, "web: retry refused: {e}");
            let text = match &e {
                RetryError::Unknown(id) => fill(ctx.t(T::RetryUnknown), &[("id", id)]),
                RetryError::NotFailed(id, step) => {
                    fill(ctx.t(T::RetryNotFailed), &[("id", id), ("state", step)])
                }
                RetryError::Ended(id) => fill(ctx.t(T::RetryEnded), &[("id", id)]),
                RetryError::Revoked(id) => fill(ctx.t(T::RetryRevoked), &[("id", id)]),
                _ => format!("{} {e}", ctx.t(T::Unavailable)),
            };
            render(state, &ctx, status, Some((text, true))).await
        }
        Err(e) => {
            render(
                state,
                &ctx,
                StatusCode::SERVICE_UNAVAILABLE,
                Some((e.to_string(), true)),
            )
            .await
        }
    }
}
