//! The login form (with the pre-session CSRF cookie), the login with its lock-out, and
//! the logout.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use zeroize::Zeroizing;

use super::i18n::{T, fill};

use super::{Ctx, WebState, html_response, layout, set_cookie};

/// Why the login page is shown.
#[derive(serde::Deserialize, Default)]
pub(super) struct Shown {
    /// The session ended (idle, too old, or the user was removed).
    #[serde(default)]
    ended: Option<String>,
    /// The user logged out.
    #[serde(default)]
    out: Option<String>,
}

/// The login form's fields.
#[derive(serde::Deserialize)]
pub(super) struct Login {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

/// The login form with `notice`, under the pre-session CSRF token of the request's cookie
/// (kept, so that another tab or the browser's own requests do not void a form already
/// shown), or a fresh one.
fn form(
    state: &WebState,
    ctx: &Ctx,
    headers: &HeaderMap,
    status: StatusCode,
    notice: Option<(String, bool)>,
) -> Response {
    let kept = super::cookie(headers, state.login_cookie())
        .filter(|t| state.sessions.issued_login_form(t));
    let Some(token) = kept.or_else(|| state.sessions.issue_login_form().ok()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no randomness from the system\n",
        )
            .into_response();
    };
    let body = html! {
        @if let Some((text, alert)) = &notice {
            @if *alert {
                p.notice.error role="alert" id="login-error" { (text) }
            } @else {
                p.notice role="status" { (text) }
            }
        }
        form.login method="post" action="/login" {
            input type="hidden" name="csrf" value=(token);
            p {
                label for="user" { (ctx.t(T::UserName)) }
                input id="user" name="user" type="text" autocomplete="username" required autofocus
                    maxlength=(super::users::MAX_NAME) autocapitalize="none" spellcheck="false";
            }
            p {
                label for="password" { (ctx.t(T::Password)) }
                input id="password" name="password" type="password" autocomplete="current-password" required
                    maxlength=(super::users::MAX_PASSWORD);
            }
            p { button type="submit" { (ctx.t(T::LoginButton)) } }
        }
    };
    let mut response = (
        status,
        html_response(layout(ctx, ctx.t(T::LoginTitle), body)),
    )
        .into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state.login_cookie(), &token, state.https, None),
    );
    response
}

/// `GET /login`.
pub(super) async fn page(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    headers: HeaderMap,
    Query(shown): Query<Shown>,
) -> Response {
    if ctx.session.is_some() {
        return Redirect::to("/receive").into_response();
    }
    let notice = if shown.ended.is_some() {
        Some((ctx.t(T::SessionEnded).to_owned(), false))
    } else if shown.out.is_some() {
        Some((ctx.t(T::LoggedOut).to_owned(), false))
    } else {
        None
    };
    form(&state, &ctx, &headers, StatusCode::OK, notice)
}

/// `POST /login` (its CSRF token checked by the guard): refused while the name or the
/// address is locked out, else the password checked (off the runtime, a few at once).
pub(super) async fn submit(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
    headers: HeaderMap,
    axum::Form(login): axum::Form<Login>,
) -> Response {
    let password = Zeroizing::new(login.password);
    let name = if super::users::is_name(login.user.trim()) {
        login.user.trim().to_owned()
    } else {
        "-".to_owned()
    };
    let locked_text = |locked: super::session::Locked| {
        let until = super::i18n::until(ctx.lang, locked.until.div_ceil(1000), &state.zone);
        let text = if locked.by_address {
            T::LockedAddress
        } else {
            T::LockedName
        };
        (fill(ctx.t(text), &[("until", &until)]), true)
    };
    let refuse_locked = || {
        let locked = state
            .sessions
            .locked(&name, ctx.peer, crate::clock::now_ms())?;
        tracing::warn!(user = %name, address = %ctx.peer, "web: login refused: locked out after repeated failures");
        Some(form(
            &state,
            &ctx,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            Some(locked_text(locked)),
        ))
    };
    if let Some(refused) = refuse_locked() {
        return refused;
    }
    let Ok(_permit) = state.logins.acquire().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    // Again with the slot held: logins sent at once all passed the check above while
    // the first ones were being verified; now each sees the failures counted before it.
    if let Some(refused) = refuse_locked() {
        return refused;
    }
    let (check, user) = (state.clone(), name.clone());
    let good = tokio::task::spawn_blocking(move || {
        check
            .users
            .verify(&user, &password)
            .then(|| check.users.key(&user))
            .flatten()
    })
    .await
    .ok()
    .flatten();
    let now = crate::clock::now_ms();
    let Some(key) = good else {
        let failures = state.sessions.failed(&name, ctx.peer, now);
        tracing::warn!(user = %name, address = %ctx.peer, failures, "web: failed login");
        return match state.sessions.locked(&name, ctx.peer, now) {
            Some(locked) => form(
                &state,
                &ctx,
                &headers,
                StatusCode::TOO_MANY_REQUESTS,
                Some(locked_text(locked)),
            ),
            None => form(
                &state,
                &ctx,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some((ctx.t(T::LoginFailed).to_owned(), true)),
            ),
        };
    };
    state.sessions.succeeded(&name);
    let Ok(id) = state.sessions.start(&name, &key, now) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no randomness from the system\n",
        )
            .into_response();
    };
    tracing::info!(user = %name, address = %ctx.peer, "web: login");
    let mut response = Redirect::to("/receive").into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(state.session_cookie(), &id, state.https, None),
    );
    headers.append(
        header::SET_COOKIE,
        set_cookie(state.login_cookie(), "", state.https, Some(0)),
    );
    response
}

/// `POST /logout`: ends the session.
pub(super) async fn logout(
    State(state): State<Arc<WebState>>,
    Extension(ctx): Extension<Ctx>,
) -> Response {
    if let Some((id, session)) = &ctx.session {
        state.sessions.end(id);
        tracing::info!(user = %session.user, "web: logout");
    }
    let mut response = Redirect::to("/login?out=1").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state.session_cookie(), "", state.https, Some(0)),
    );
    response
}
