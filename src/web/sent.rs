//! Sent: the tokens this facility issued, newest first, with route, study, expiry,
//! downloads used and receipts (the repository's answers, as `cloudpdi status` gets
//! them), and the slip to print again (`GET /sent/{id}/slip`: the file the job wrote in
//! its token folder, never a path from the request).
//!
//! Each row's last cell holds its actions: Re-print (revoke and extend are not on this
//! page yet: `cloudpdi revoke` and `cloudpdi extend` do them).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::html;

use super::i18n::{T, fill};
use super::{Ctx, WebState, html_response, layout, message_page, study};
use crate::gateway::jobs::Pipeline;
use crate::gateway::outbound::OutboundJob;
use crate::token::slip::SlipFormat;

/// Largest slip file served: a slip is a few tens of kilobytes (HTML, SVG, PNG or PDF).
pub const MAX_SLIP_BYTES: u64 = 4 * 1024 * 1024;

/// `GET /sent`.
pub(super) async fn page(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
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
    let body = html! {
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
                        @let document = detail.and_then(|d| d.document.as_ref());
                        tr id={ "sent-" (job.id) } {
                            th scope="row" { (job.id) }
                            td { (job.route) }
                            td { (study(&ctx, job.study.as_ref())) }
                            td {
                                (super::i18n::until(ctx.lang, u64::from(job.expires_at), &state.zone))
                                @if u64::from(job.expires_at) <= now { " " strong { (ctx.t(T::Expired)) } }
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
                                @if job.slip_file.is_some() {
                                    a href={ "/sent/" (job.id) "/slip" } target="_blank" rel="noopener" { (ctx.t(T::Reprint)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(layout(&ctx, ctx.t(T::SentTitle), body))
}

/// `GET /sent/{id}/slip`: the job's slip file as it was written, for printing again: only
/// from the route's token folder, never through a symbolic link, at most
/// [`MAX_SLIP_BYTES`]; shown sandboxed (no script, no form, no own origin).
pub(super) async fn slip(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> Response {
    let outbound = state.admin.outbound.clone();
    let asked = id.clone();
    let read = tokio::task::spawn_blocking(move || {
        let Some(job) = outbound.store().get::<OutboundJob>(&asked).ok().flatten() else {
            return Ok(None);
        };
        let Some(path) = job.slip_file.clone() else {
            return Ok(None);
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
        Ok(Some((format, bytes)))
    })
    .await;
    let (format, bytes) = match read {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return message_page(&ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound)),
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
