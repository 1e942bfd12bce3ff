//! `GET /v1/documents/{id}/content`: the receiver's download, whole or from a byte
//! offset. A request from byte 0 takes one of the document's downloads; a later start is
//! a resume of the open download, within its window and resume count.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::repository::api::{self, State as DocState};
use crate::repository::storage::{DocumentMeta, Snapshot, Storage, StorageError};
use crate::repository::unix_now;

use super::authenticate::{Download, Proven};
use super::caller::Answer;
use super::documents::state_of;
use super::range::parse_range;
use super::refusal::Refusal;
use super::{App, Shared};

/// `GET /v1/documents/{id}/content`.
pub(super) async fn download(
    State(app): Shared,
    proven: Proven<Download>,
    headers: HeaderMap,
) -> Response {
    let result = serve(&app, proven.snapshot, &headers).await;
    proven.caller.answer(&app, result).await
}

async fn serve(app: &App, snapshot: Snapshot, headers: &HeaderMap) -> Result<Answer, Refusal> {
    if state_of(&snapshot, unix_now()) != DocState::Complete {
        return Err(Refusal::not_available());
    }
    let record = app
        .storage
        .complete_record(&snapshot.meta.id)
        .await
        .map_err(Refusal::unavailable)?
        .ok_or_else(|| Refusal::unavailable("complete record vanished"))?;
    let Some(size) = record.size.or(snapshot.meta.size) else {
        return Err(Refusal::unavailable("complete record without a size"));
    };
    let meta = DocumentMeta {
        size: Some(size),
        ..snapshot.meta.clone()
    };
    let range = match parse_range(headers) {
        None => None,
        Some((start, end)) if start < size && end.is_none_or(|e| e >= start) => {
            Some((start, end.map_or(size, |e| e.saturating_add(1).min(size))))
        }
        Some(_) => {
            return Ok(range_not_satisfiable(
                size,
                app.owner(&snapshot.meta.facility),
            ));
        }
    };
    let resumed = match range {
        Some((start, _)) if start > 0 => app
            .storage
            .claim_resume(
                &snapshot,
                unix_now(),
                app.server.download_resume_window,
                app.server.max_resumes_per_download,
            )
            .await
            .map_err(Refusal::unavailable)?,
        _ => false,
    };
    // A range that is not a resume of an open download is answered as a new download
    // from byte 0 (a server may ignore Range); the client then starts its file over.
    let range = if resumed {
        range
    } else {
        if !app
            .storage
            .claim_download(&snapshot, unix_now())
            .await
            .map_err(Refusal::unavailable)?
        {
            return Err(Refusal::not_available());
        }
        app.metrics.downloads.inc();
        range.filter(|&(start, _)| start == 0)
    };
    let (start, end) = range.unwrap_or((0, size));
    app.metrics.bytes_downloaded.inc_by(end - start);
    let snapshot_facility = app.owner(&snapshot.meta.facility).to_owned();
    let body = Body::from_stream(content_stream(app.storage.clone(), meta, start, end));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).expect("ASCII header value");
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, value((end - start).to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(sha256) = record.sha256 {
        h.insert(api::SHA256_HEADER, value(hex::encode(sha256)));
    }
    if let Some(parts_sha256) = record.parts_sha256 {
        h.insert(api::PARTS_SHA256_HEADER, value(hex::encode(parts_sha256)));
        h.insert(
            api::PART_SIZE_HEADER,
            value(snapshot.meta.part_size.to_string()),
        );
    }
    if let Ok(facility) = HeaderValue::from_str(&snapshot_facility) {
        h.insert(api::FACILITY_HEADER, facility);
    }
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            value(format!("bytes {start}-{}/{size}", end - 1)),
        );
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let resumed = if resumed { " resumed" } else { "" };
    Ok(Answer::ok(response).with_detail(format!("bytes {start}-{}/{size}{resumed}", end - 1)))
}

/// 416 with the document's size (and its facility: a receiver that had every byte
/// finishes with this answer), for a range that lies outside it. The receiver proved the
/// token, so this is audited as an answer of its own, not aggregated as a refusal.
fn range_not_satisfiable(size: u64, facility: &str) -> Answer {
    let mut response = Refusal::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        format!("the document has {size} bytes"),
    )
    .into_response();
    response.headers_mut().insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("digits are a header"),
    );
    if let Ok(facility) = HeaderValue::from_str(facility) {
        response
            .headers_mut()
            .insert(api::FACILITY_HEADER, facility);
    }
    Answer::ok(response).with_outcome("range_not_satisfiable")
}

/// The bytes `start..end` of a document, part after part, read as the client takes them.
fn content_stream(
    storage: Storage,
    meta: DocumentMeta,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, StorageError>> {
    let first = u32::try_from(start / meta.part_size).unwrap_or(u32::MAX);
    let last = u32::try_from((end - 1) / meta.part_size).unwrap_or(u32::MAX);
    futures_util::stream::iter(first..=last)
        .then(move |n| {
            let storage = storage.clone();
            let part_start = u64::from(n) * meta.part_size;
            let part_len = meta.part_len(n).unwrap_or(0);
            let from = start.saturating_sub(part_start);
            let to = (end - part_start).min(part_len);
            let id = meta.id.clone();
            async move { storage.part_stream(&id, n, from..to).await }
        })
        .flat_map(|opened| match opened {
            Ok(stream) => stream,
            Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
        })
}
