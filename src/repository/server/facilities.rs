//! `GET /v1/facilities/{code}`: the directory of facilities, so that a sender finds the
//! public key to seal a token to (and checks its fingerprint against its pin).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::authenticate::{Facility, LookUpFacility};
use super::caller::Answer;
use super::refusal::Refusal;
use super::{App, Shared};

/// `GET /v1/facilities/{code}`.
pub(super) async fn look_up(
    State(app): Shared,
    facility: Facility<LookUpFacility>,
    Path(code): Path<String>,
) -> Response {
    let result = entry(&app, &code);
    facility.caller.answer(&app, result).await
}

fn entry(app: &App, code: &str) -> Result<Answer, Refusal> {
    if !crate::facility::is_code(code) {
        return Err(Refusal::invalid_facility_code());
    }
    match app.directory.get(code) {
        Some(entry) => Ok(Answer::ok(Json(entry.clone())).with_detail(format!("facility {code}"))),
        None => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "unknown_facility",
            format!(
                "this repository has no facility {code} with a registered public key: ask \
                 the repository operator to register its key (public_key of [facility.{code}])"
            ),
        )),
    }
}
