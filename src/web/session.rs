//! Sessions, CSRF tokens and lock-outs, all in memory (a restart logs everyone out).
//!
//! A session is a 256-bit random ID in the cookie [`SESSION_COOKIE`] (`HttpOnly;
//! SameSite=Strict; Path=/`, plus `Secure` over HTTPS); it ends after
//! `web.session_idle_minutes` without a request, `web.session_max_hours` after the login,
//! at the logout, or when its user leaves the users file or gets another password. Each session has its own CSRF
//! token, which every POST must carry (a form field or the [`CSRF_HEADER`]); the login
//! form, before any session, carries the one of the pre-session cookie [`LOGIN_COOKIE`].
//!
//! Lock-out: `web.lockout_after` failed logins from one client address refuse every
//! login from that address (the right password too) until `web.lockout_minutes` after the
//! last failure, so that spraying one password over many names does not get far; as many
//! failures for one user name refuse that name from every address that has a recent
//! failure of its own, so that guessing one password does not get far either (each new
//! address gets one guess), while a clerk at another computer, with no failure, still
//! logs in with the right password: someone who types wrong passwords for every clerk's
//! name does not lock them all out. Clerks behind one address (a proxy, NAT, or the
//! loopback) share its count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "cloudpdi_session";

/// The pre-session cookie of the login form (its CSRF token).
pub const LOGIN_COOKIE: &str = "cloudpdi_login";

/// The header a script's POST carries the CSRF token in (the forms use a field).
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Sessions held at once; a new login beyond it ends the session idle the longest, so
/// logins cannot grow the memory without bound.
pub const MAX_SESSIONS: usize = 1024;

/// Sessions one user holds at once; a new login of that user beyond it ends the user's
/// session idle the longest, so that one user's logins cannot push everyone else out.
pub const MAX_SESSIONS_PER_USER: usize = 16;

/// Pre-session tokens (of login forms shown) remembered at once; beyond it the oldest
/// is forgotten (its form then asks to reload the page).
pub const MAX_LOGIN_FORMS: usize = 4096;

/// User names and client addresses whose failed logins are counted at once; beyond it
/// the entries whose lock-out ended are forgotten, then the oldest.
pub const MAX_TRACKED: usize = 4096;

/// A random identifier: 256 bits, hex.
///
/// # Errors
/// The system gave no randomness.
pub fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What a request learns about its session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user's name.
    pub user: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// A digest of the user's password hash at the login ([`super::users::Users::key`]):
    /// when the password changes (or the user is removed and added again) it differs,
    /// and the session ends.
    pub key: String,
}

#[derive(Debug)]
struct Entry {
    session: Session,
    created: u64,
    seen: u64,
}

/// Limits of sessions and lock-outs (from `[web]`), in milliseconds and counts.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Idle time that ends a session.
    pub idle_ms: u64,
    /// Age that ends a session.
    pub max_ms: u64,
    /// Failures that lock a name or an address out.
    pub lockout_after: u32,
    /// How long a lock-out lasts after the last failure.
    pub lockout_ms: u64,
}

impl Policy {
    /// The policy of `[web]`.
    pub fn of(web: &crate::config::WebConfig) -> Policy {
        Policy {
            idle_ms: web.session_idle_minutes.saturating_mul(60_000),
            max_ms: web.session_max_hours.saturating_mul(3_600_000),
            lockout_after: web.lockout_after,
            lockout_ms: web.lockout_minutes.saturating_mul(60_000),
        }
    }
}

/// Failed logins of one name or address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: u64,
}

/// Why a login is refused before its password is checked: locked out until `until` (Unix
/// milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// When logins are accepted again.
    pub until: u64,
    /// Whether the address (not only the name) is locked.
    pub by_address: bool,
}

/// Every session and failure count of the page.
pub struct Sessions {
    policy: Policy,
    sessions: Mutex<HashMap<String, Entry>>,
    names: Mutex<HashMap<String, Failures>>,
    addresses: Mutex<HashMap<IpAddr, Failures>>,
    forms: Mutex<std::collections::VecDeque<String>>,
}

impl Sessions {
    /// No session yet.
    pub fn new(policy: Policy) -> Arc<Sessions> {
        Arc::new(Sessions {
            policy,
            sessions: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
            forms: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Starts a session for `user`, whose password hash has the digest `key`; returns its
    /// ID (the cookie's value).
    ///
    /// # Errors
    /// The system gave no randomness.
    pub fn start(&self, user: &str, key: &str, now: u64) -> Result<String, getrandom::Error> {
        let id = random_id()?;
        let csrf = random_id()?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut sessions, now);
        let mine = sessions.values().filter(|e| e.session.user == user).count();
        if mine >= MAX_SESSIONS_PER_USER
            && let Some(oldest) = sessions
                .iter()
                .filter(|(_, e)| e.session.user == user)
                .min_by_key(|(_, e)| e.seen)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, e)| e.seen)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Entry {
                session: Session {
                    user: user.to_owned(),
                    csrf,
                    key: key.to_owned(),
                },
                created: now,
                seen: now,
            },
        );
        Ok(id)
    }

    fn expire(&self, sessions: &mut HashMap<String, Entry>, now: u64) {
        let policy = self.policy;
        sessions.retain(|_, e| {
            now.saturating_sub(e.seen) < policy.idle_ms
                && now.saturating_sub(e.created) < policy.max_ms
        });
    }

    /// The live session of `id`, its idle time restarted; `None` when it ended.
    pub fn touch(&self, id: &str, now: u64) -> Option<Session> {
        self.find(id, now, true)
    }

    /// The live session of `id` without restarting its idle time (a progress stream and
    /// its reconnections do not keep an unattended session alive); `None` when it ended.
    pub fn peek(&self, id: &str, now: u64) -> Option<Session> {
        self.find(id, now, false)
    }

    fn find(&self, id: &str, now: u64, touch: bool) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let policy = self.policy;
        let entry = sessions.get_mut(id)?;
        if now.saturating_sub(entry.seen) >= policy.idle_ms
            || now.saturating_sub(entry.created) >= policy.max_ms
        {
            sessions.remove(id);
            return None;
        }
        if touch {
            entry.seen = now;
        }
        Some(entry.session.clone())
    }

    /// A new pre-session token for a login form, remembered (at most
    /// [`MAX_LOGIN_FORMS`]), so that only tokens this page issued are accepted: a cookie
    /// planted by another service on the same host is not.
    ///
    /// # Errors
    /// The system gave no randomness.
    pub fn issue_login_form(&self) -> Result<String, getrandom::Error> {
        let token = random_id()?;
        let mut forms = self.forms.lock().unwrap_or_else(|e| e.into_inner());
        if forms.len() >= MAX_LOGIN_FORMS {
            forms.pop_front();
        }
        forms.push_back(token.clone());
        Ok(token)
    }

    /// Whether `token` is a pre-session token this page issued (and still remembers).
    pub fn issued_login_form(&self, token: &str) -> bool {
        let forms = self.forms.lock().unwrap_or_else(|e| e.into_inner());
        forms.iter().any(|issued| same_secret(issued, token))
    }

    /// Ends session `id` (logout, or its user was removed).
    pub fn end(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(id);
    }

    /// Whether logins of `name` from `address` are refused now, and until when: the
    /// address is locked, or the name is and the address has a recent failure.
    pub fn locked(&self, name: &str, address: IpAddr, now: u64) -> Option<Locked> {
        let policy = self.policy;
        let until = |f: &Failures| {
            (f.count >= policy.lockout_after)
                .then(|| f.last.saturating_add(policy.lockout_ms))
                .filter(|until| *until > now)
        };
        let here = self
            .addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&address)
            .copied();
        let by_address = here.as_ref().and_then(until);
        let failed_here = here.is_some_and(|f| now.saturating_sub(f.last) < policy.lockout_ms);
        let by_name = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .and_then(until)
            .filter(|_| failed_here);
        match (by_address, by_name) {
            (Some(a), Some(n)) => Some(Locked {
                until: a.max(n),
                by_address: true,
            }),
            (Some(a), None) => Some(Locked {
                until: a,
                by_address: true,
            }),
            (None, Some(n)) => Some(Locked {
                until: n,
                by_address: false,
            }),
            (None, None) => None,
        }
    }

    /// Counts a failed login of `name` from `address`; returns the failures of the name.
    pub fn failed(&self, name: &str, address: IpAddr, now: u64) -> u32 {
        let policy = self.policy;
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let count = count_failure(&mut names, name.to_owned(), now, policy);
        drop(names);
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        count_failure(&mut addresses, address, now, policy);
        count
    }

    /// Forgets the failures of `name` after a successful login (those of the address
    /// stay: a spray that guessed one password is still counted).
    pub fn succeeded(&self, name: &str) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.remove(name);
    }
}

/// Adds a failure for `key`; a count whose lock-out (or window) passed starts again.
/// The table stays within [`MAX_TRACKED`] entries.
fn count_failure<K: std::hash::Hash + Eq>(
    table: &mut HashMap<K, Failures>,
    key: K,
    now: u64,
    policy: Policy,
) -> u32 {
    if table.len() >= MAX_TRACKED && !table.contains_key(&key) {
        table.retain(|_, f| now.saturating_sub(f.last) < policy.lockout_ms);
        if table.len() >= MAX_TRACKED {
            let oldest = table.values().map(|f| f.last).min().unwrap_or(now);
            table.retain(|_, f| f.last > oldest);
        }
    }
    let entry = table.entry(key).or_insert(Failures {
        count: 0,
        last: now,
    });
    if now.saturating_sub(entry.last) >= policy.lockout_ms {
        entry.count = 0;
    }
    entry.count = entry.count.saturating_add(1);
    entry.last = now;
    entry.count
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    fn policy() -> Policy {
        Policy {
            idle_ms: 30 * MINUTE,
            max_ms: 12 * 60 * MINUTE,
            lockout_after: 3,
            lockout_ms: 15 * MINUTE,
        }
    }

    #[test]
    fn sessions_end_when_idle_or_old_or_logged_out() {
        let sessions = Sessions::new(policy());
        let id = sessions.start("clerk", "k", 0).expect("random");
        assert_eq!(id.len(), 64);
        let session = sessions.touch(&id, 29 * MINUTE).expect("alive");
        assert_eq!(session.user, "clerk");
        assert_eq!(session.csrf.len(), 64);
        assert!(
            sessions.touch(&id, 59 * MINUTE - 1).is_some(),
            "idle restarts"
        );
        assert!(sessions.touch(&id, 89 * MINUTE).is_none(), "idle too long");
        let id = sessions.start("clerk", "k", 0).expect("random");
        let mut now = 0;
        while now + 20 * MINUTE < 12 * 60 * MINUTE {
            now += 20 * MINUTE;
            assert!(sessions.touch(&id, now).is_some());
        }
        assert!(sessions.touch(&id, 12 * 60 * MINUTE).is_none(), "too old");
        let id = sessions.start("clerk", "k", 0).expect("random");
        sessions.end(&id);
        assert!(sessions.touch(&id, 1).is_none(), "logged out");
        assert!(sessions.touch("not a session", 1).is_none());
    }

    #[test]
    fn one_users_logins_do_not_push_the_others_out() {
        let sessions = Sessions::new(policy());
        let other = sessions.start("nurse", "k", 0).expect("random");
        let first = sessions.start("clerk", "k", 1).expect("random");
        for n in 2..2 + 2 * MAX_SESSIONS as u64 {
            sessions.start("clerk", "k", n).expect("random");
        }
        assert!(sessions.touch(&other, 5_000).is_some(), "the nurse stays");
        assert!(sessions.touch(&first, 5_000).is_none(), "the oldest went");
        let held = sessions.sessions.lock().expect("lock").len();
        assert_eq!(held, MAX_SESSIONS_PER_USER + 1);
    }

    #[test]
    fn sessions_are_bounded() {
        let sessions = Sessions::new(policy());
        let first = sessions.start("a", "k", 0).expect("random");
        for n in 1..MAX_SESSIONS as u64 {
            sessions
                .start(&format!("b{}", n % 100), "k", n)
                .expect("random");
        }
        assert!(sessions.touch(&first, MAX_SESSIONS as u64).is_some());
        sessions
            .start("c", "k", MAX_SESSIONS as u64 + 1)
            .expect("random");
        assert_eq!(sessions.sessions.lock().expect("lock").len(), MAX_SESSIONS);
        assert!(
            sessions.touch(&first, MAX_SESSIONS as u64 + 2).is_some(),
            "the session idle the longest went, not the one just used"
        );
    }

    #[test]
    fn failures_lock_the_name_and_the_address_until_the_lock_ends() {
        let sessions = Sessions::new(policy());
        let here = IpAddr::from([192, 0, 2, 1]);
        let there = IpAddr::from([192, 0, 2, 2]);
        for n in 1..=3 {
            assert_eq!(sessions.locked("clerk", here, n), None);
            assert_eq!(sessions.failed("clerk", here, n), n as u32);
        }
        assert_eq!(
            sessions.locked("clerk", there, 4),
            None,
            "the right password from an address without failures is still checked"
        );
        assert_eq!(sessions.failed("clerk", there, 4), 4);
        let locked = sessions.locked("clerk", there, 5).expect("name locked");
        assert_eq!(locked.until, 4 + 15 * MINUTE);
        assert!(!locked.by_address);
        let locked = sessions.locked("other", here, 4).expect("address locked");
        assert!(locked.by_address);
        assert_eq!(sessions.locked("other", there, 4), None);
        assert_eq!(
            sessions.locked("clerk", here, 4 + 15 * MINUTE),
            None,
            "ended"
        );
        assert_eq!(
            sessions.failed("clerk", there, 4 + 15 * MINUTE),
            1,
            "a new count after the lock"
        );
        // A spray: one password over many names from one address.
        let sessions = Sessions::new(policy());
        for (n, name) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(sessions.failed(name, here, n as u64), 1);
        }
        assert!(sessions.locked("d", here, 3).is_some_and(|l| l.by_address));
        sessions.succeeded("a");
        assert!(sessions.locked("a", there, 3).is_none());
    }

    #[test]
    fn failure_tables_are_bounded() {
        let sessions = Sessions::new(policy());
        for n in 0..MAX_TRACKED as u64 + 10 {
            let address = IpAddr::from(u32::try_from(n).expect("small").to_be_bytes());
            sessions.failed(&format!("user{n}"), address, n);
        }
        assert!(sessions.names.lock().expect("lock").len() <= MAX_TRACKED);
        assert!(sessions.addresses.lock().expect("lock").len() <= MAX_TRACKED);
        assert_eq!(
            sessions.failed("user0", IpAddr::from([10, 0, 0, 1]), 99_999),
            1
        );
    }

    #[test]
    fn only_issued_login_forms_are_accepted() {
        let sessions = Sessions::new(policy());
        let first = sessions.issue_login_form().expect("random");
        assert!(sessions.issued_login_form(&first));
        assert!(!sessions.issued_login_form(&"a".repeat(64)), "planted");
        for _ in 0..MAX_LOGIN_FORMS {
            sessions.issue_login_form().expect("random");
        }
        assert!(!sessions.issued_login_form(&first), "forgotten, bounded");
        assert_eq!(sessions.forms.lock().expect("lock").len(), MAX_LOGIN_FORMS);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }
}
