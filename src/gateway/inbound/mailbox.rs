//! The mailbox: tokens other facilities sealed to this one and posted to its mailbox in
//! the repository become inbound jobs, as if dropped into the watch folder.
//!
//! Every `inbound.mailbox_poll_interval` seconds the task lists the mailbox (this
//! facility's API key: the repository shows a facility only its own mailbox) and, for each
//! message, oldest first:
//! 1. the sender, authenticated by the repository, must be in `inbound.accept_from`;
//! 2. its key, looked up in the repository's directory, must have the fingerprint pinned
//!    in `[facilities.SENDER]`;
//! 3. the message must open with this facility's key (`facility.key_file`, then each of
//!    `facility.previous_key_files`) as sealed by that sender to this facility (HPKE
//!    authenticated mode), and hold a token;
//! 4. the token is queued durably (the job folder and record are flushed), the sender
//!    shown as such;
//! 5. only then is the message deleted from the mailbox.
//!
//! A crash anywhere before 5 leaves the message in the mailbox: the next poll takes it
//! again, and since the job's ID is derived from the document, a second queueing finds the
//! job and only deletes the message.
//!
//! A message from a sender not in `accept_from`, or holding an expired token, is refused:
//! recorded for `cloudpdi status`, logged once, then deleted. A message from an accepted
//! sender that fails at 2-4 for a reason an admin can fix (no key or another key in the
//! directory, does not open, a token this gateway cannot use yet) **waits**: its refusal is
//! recorded and logged once per message (in this process), it stays in the mailbox and is
//! tried again at every poll, so fixing the pin or the configuration imports it by itself;
//! one still waiting [`MAX_WAIT_DAYS`] days after it was posted is recorded and deleted.
//! A local failure or an unreachable repository is retried at the next poll.
//!
//! Refusal records are kept per sender for the senders of `accept_from` and those with a
//! `[facilities]` pin; every other sender shares the one record [`OTHER_SENDERS`], so a
//! hostile repository inventing senders cannot grow the database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::config::Config;
use crate::facility::{FacilityKey, Fingerprint, PublicKey};
use crate::gateway::inbound::{Inbound, QueueError, Queued};
use crate::gateway::store::IndexError;
use crate::repository::api::MessageInfo;
use crate::repository::client::{Client, FacilityClientError};
use crate::token::Token;

/// Days a message from an accepted sender may wait in the mailbox for a fix (a pin, a key,
/// the configuration) after it was posted; then it is recorded as refused and deleted.
pub const MAX_WAIT_DAYS: u64 = 30;

/// The refusal record shared by every sender neither in `inbound.accept_from` nor pinned
/// in `[facilities]` (the reason names the sender): one record, however many senders.
pub const OTHER_SENDERS: &str = "(other facilities)";

/// A sending facility whose sealed tokens were refused: the last reason and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The sender's facility code (as the repository authenticated it), or
    /// [`OTHER_SENDERS`] for a sender neither accepted nor pinned.
    pub sender: String,
    /// Why its last message was refused, and what to do.
    pub reason: String,
    /// Messages refused from it.
    pub messages: u64,
    /// When the first was refused (Unix milliseconds).
    pub first_at: u64,
    /// When the last was refused (Unix milliseconds).
    pub last_at: u64,
    /// The repository's ID of the last message refused.
    pub last_message: String,
}

/// What became of one message.
enum Outcome {
    /// Queued (or known already): delete it.
    Queued(Queued),
    /// Refused for good: record, then delete.
    Refused(String),
    /// Refused for a reason an admin can fix: record once, keep, try again at each poll.
    Waiting(String),
    /// A failure here or at the repository: leave it for the next poll.
    Later(String),
}

/// The mailbox task of the daemon.
pub struct Mailbox {
    inbound: Arc<Inbound>,
    client: Client,
    /// This facility's keys: `facility.key_file`, then `facility.previous_key_files`.
    keys: Vec<Arc<FacilityKey>>,
    /// This facility's code, to which senders seal.
    code: String,
    /// `inbound.accept_from`, each with its pinned fingerprint.
    accepted: BTreeMap<String, Fingerprint>,
    /// Every facility with a `[facilities]` pin: refusals of these get a record each.
    pinned: BTreeSet<String>,
    poll: Duration,
    /// Waiting messages whose refusal is recorded and logged already (this process):
    /// only those still listed are kept, so at most one listing's worth.
    noted: Mutex<BTreeSet<String>>,
}

impl Mailbox {
    /// The mailbox of this facility in the repository of `[repository]`, read with its
    /// API key, for the senders of `inbound.accept_from`.
    ///
    /// # Errors
    /// A sentence naming the key to fix: the API key file cannot be read, an earlier key
    /// of `facility.previous_key_files` cannot be loaded, or a pin does not parse.
    pub fn new(
        config: &Config,
        inbound: Arc<Inbound>,
        key: Arc<FacilityKey>,
    ) -> Result<Mailbox, String> {
        let client = Client::for_facility(
            config.repository.url.trim_end_matches('/'),
            &config.repository.api_key_file,
            config.repository.allow_plain_http,
        )
        .map_err(|e| match e {
            FacilityClientError::KeyFile { .. } => format!(
                "inbound.accept_from: {e}: set repository.api_key_file and restart the daemon"
            ),
            other => format!("inbound.accept_from: {other}"),
        })?;
        let mut keys = vec![key];
        for path in &config.facility.previous_key_files {
            let previous = FacilityKey::load(path).map_err(|e| {
                format!(
                    "facility.previous_key_files: {e}; fix the file (mode 0600) or remove it \
                     from the list, and restart the daemon"
                )
            })?;
            keys.push(Arc::new(previous));
        }
        let mut accepted = BTreeMap::new();
        for sender in &config.inbound.accept_from {
            let pin = config
                .facilities
                .get(sender)
                .map(|pin| pin.fingerprint.as_str())
                .unwrap_or_default();
            let pin = Fingerprint::parse(pin)
                .map_err(|e| format!("facilities.{sender}.fingerprint: {e}"))?;
            accepted.insert(sender.clone(), pin);
        }
        Ok(Mailbox {
            inbound,
            client,
            keys,
            code: config.facility.code.clone(),
            accepted,
            pinned: config.facilities.keys().cloned().collect(),
            poll: Duration::from_secs(config.inbound.mailbox_poll_interval.max(1)),
            noted: Mutex::new(BTreeSet::new()),
        })
    }

    /// Reads the mailbox now, then every poll interval, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                read = self.read() => match read {
                    Ok(()) if failing => {
                        info!("mailbox readable again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        // Once per outage, not at every poll.
                        if !failing {
                            warn!("cannot read the mailbox (will retry every {} s): {e}", self.poll.as_secs());
                        }
                        failing = true;
                    }
                },
                () = cancel.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(self.poll) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// One reading: every message listed, oldest first.
    async fn read(&self) -> Result<(), crate::repository::client::ClientError> {
        let listed = self.client.messages().await?;
        let mut waiting = BTreeSet::new();
        let taken = self.take_listed(listed, &mut waiting).await;
        // Only the waiting messages of this listing stay noted (even after a failure).
        self.noted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|id| waiting.contains(id));
        taken
    }

    /// Takes the messages of one listing; the IDs of those left waiting go to `waiting`.
    async fn take_listed(
        &self,
        listed: Vec<MessageInfo>,
        waiting: &mut BTreeSet<String>,
    ) -> Result<(), crate::repository::client::ClientError> {
        for message in listed {
            let id = message.message_id.clone();
            match self.take(&message).await {
                Outcome::Queued(Queued::New(job) | Queued::Known(job)) => {
                    self.client.delete_message(&id).await?;
                    info!(message = %id, from = %message.sender, job = %job, "sealed token taken from the mailbox");
                }
                Outcome::Refused(reason) => {
                    if let Err(e) = self.refuse(&message, &reason).await {
                        warn!(message = %id, "cannot record the refusal (will retry): {e}");
                        continue;
                    }
                    self.client.delete_message(&id).await?;
                }
                Outcome::Waiting(reason) => {
                    if waited_too_long(message.posted_at, now_ms() / 1000) {
                        let reason = format!(
                            "{reason}; it waited in the mailbox for {MAX_WAIT_DAYS} days and was \
                             deleted: once this is fixed, ask {} to send it again",
                            message.sender
                        );
                        if let Err(e) = self.refuse(&message, &reason).await {
                            warn!(message = %id, "cannot record the refusal (will retry): {e}");
                            continue;
                        }
                        self.client.delete_message(&id).await?;
                        continue;
                    }
                    waiting.insert(id.clone());
                    if self.is_noted(&id) {
                        continue;
                    }
                    let reason = format!(
                        "{reason} (the message waits in the mailbox and is taken by itself \
                         once this is fixed; it is deleted {MAX_WAIT_DAYS} days after it was \
                         posted)"
                    );
                    match self.refuse(&message, &reason).await {
                        Ok(()) => self.note(id),
                        Err(e) => {
                            warn!(message = %id, "cannot record the refusal (will retry): {e}");
                        }
                    }
                }
                Outcome::Later(reason) => {
                    warn!(message = %id, from = %message.sender, "sealed token not taken yet (will retry): {reason}");
                }
            }
        }
        Ok(())
    }

    /// Whether the waiting message `id` was recorded and logged already.
    fn is_noted(&self, id: &str) -> bool {
        self.noted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }

    /// Remembers that the waiting message `id` was recorded and logged.
    fn note(&self, id: String) {
        self.noted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
    }

    /// The refusal record of `sender`: its own when it is accepted or pinned, else the
    /// shared [`OTHER_SENDERS`].
    fn record_of<'a>(&self, sender: &'a str) -> &'a str {
        if self.accepted.contains_key(sender) || self.pinned.contains(sender) {
            sender
        } else {
            OTHER_SENDERS
        }
    }

    /// Checks, opens and queues one message.
    async fn take(&self, message: &MessageInfo) -> Outcome {
        let sender = &message.sender;
        let Some(pinned) = self.accepted.get(sender) else {
            return Outcome::Refused(format!(
                "facility {sender} is not in inbound.accept_from: its sealed tokens are not \
                 imported; if this hospital expects studies from {sender}, add it there \
                 with a [facilities.{sender}] pin and restart the daemon"
            ));
        };
        let entry = match self.client.facility(sender).await {
            Ok(entry) => entry,
            Err(e) if e.is_permanent() => {
                return Outcome::Waiting(format!(
                    "the repository's directory has no key for facility {sender} ({e}): ask \
                     the repository operator"
                ));
            }
            Err(e) => return Outcome::Later(e.to_string()),
        };
        let public = match PublicKey::parse(&entry.public_key) {
            Ok(public) => public,
            Err(e) => {
                return Outcome::Waiting(format!(
                    "the repository's directory gives facility {sender} a key this gateway \
                     cannot read ({e}): tell the repository operator"
                ));
            }
        };
        let found = public.fingerprint();
        if found != *pinned {
            return Outcome::Waiting(format!(
                "the repository's directory gives facility {sender} a key with fingerprint \
                 {found}, but facilities.{sender}.fingerprint pins {pinned}: call {sender} \
                 and compare the fingerprint of their key (`cloudpdi facility show`); if \
                 they changed it, pin the new one and restart the daemon"
            ));
        }
        let sealed = match self.client.message(&message.message_id).await {
            Ok(sealed) => sealed,
            Err(e) if e.is_permanent() => {
                return Outcome::Refused(format!("the repository did not give the message: {e}"));
            }
            Err(e) => return Outcome::Later(e.to_string()),
        };
        let mut opened = self
            .keys
            .iter()
            .map(|key| crate::facility::open(key, &self.code, &public, sender, &sealed));
        let first = match opened.next() {
            Some(Ok(plaintext)) => Ok(plaintext),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("no key".to_owned()),
        };
        let plaintext = match first.or_else(|e| opened.find_map(Result::ok).ok_or(e)) {
            Ok(plaintext) => plaintext,
            Err(e) => {
                let code = &self.code;
                return Outcome::Waiting(format!(
                    "the message from {sender} does not open with this facility's key as \
                     sealed by {sender} to {code} ({e}). Check with {sender}: either it \
                     sealed to a key other than the one registered for {code} (after a key \
                     rotation here, list the old key in facility.previous_key_files), or the \
                     facility codes differ from the repository's names (facility.code must \
                     equal the [facility.CODE] name in the repository's configuration, here \
                     {code} and there {sender}); else the message was damaged"
                ));
            }
        };
        let token = std::str::from_utf8(&plaintext)
            .map_err(|_| None)
            .and_then(|text| Token::from_text(text.trim()).map_err(Some));
        let token = match token {
            Ok(token) => token,
            Err(e) => {
                let why = e.map_or_else(|| "not text".to_owned(), |e| e.to_string());
                return Outcome::Waiting(format!(
                    "the sealed message from {sender} holds no token ({why}): ask {sender} \
                     which version of cloudpdi sent it"
                ));
            }
        };
        let inbound = self.inbound.clone();
        let sender = sender.clone();
        let queued = tokio::task::spawn_blocking(move || inbound.queue_sealed(&token, &sender));
        match queued.await {
            Ok(Ok(queued)) => Outcome::Queued(queued),
            Ok(Err(e @ (QueueError::Index(_) | QueueError::Io { .. }))) => {
                Outcome::Later(e.to_string())
            }
            // Expired: nothing can make it useful.
            Ok(Err(e @ QueueError::Token(_))) => Outcome::Refused(e.to_string()),
            // An unknown community, a repository not allowed: fixed in the configuration.
            Ok(Err(e)) => Outcome::Waiting(e.to_string()),
            Err(e) => Outcome::Later(e.to_string()),
        }
    }

    /// Records the refusal of `message` durably under its sender's record
    /// ([`Mailbox::record_of`]), logged when new to the record: a message refused again
    /// for the same reason after a failed delete is not logged twice.
    async fn refuse(&self, message: &MessageInfo, reason: &str) -> Result<(), String> {
        let inbound = self.inbound.clone();
        let record_key = self.record_of(&message.sender).to_owned();
        let (message, reason) = (message.clone(), reason.to_owned());
        let recorded = tokio::task::spawn_blocking(move || {
            let store = &inbound.refusals;
            let now = now_ms();
            let mut record = store.get::<Refusal>(&record_key)?.unwrap_or(Refusal {
                sender: record_key.clone(),
                reason: String::new(),
                messages: 0,
                first_at: now,
                last_at: now,
                last_message: String::new(),
            });
            if record.last_message == message.message_id && record.reason == reason {
                return Ok(());
            }
            record.messages = record.messages.saturating_add(1);
            record.last_at = now;
            record.reason = reason.clone();
            record.last_message = message.message_id.clone();
            store.put(&record_key, &record)?;
            warn!(message = %message.message_id, from = %message.sender, "sealed token refused: {reason}");
            Ok::<_, IndexError>(())
        })
        .await;
        match recorded {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Whether a message posted at `posted_at` has waited [`MAX_WAIT_DAYS`] by `now` (both
/// Unix seconds; a time from the future counts as just posted).
fn waited_too_long(posted_at: u64, now: u64) -> bool {
    now.saturating_sub(posted_at) >= MAX_WAIT_DAYS.saturating_mul(24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_message_is_deleted_after_thirty_days() {
        let posted = 1_780_000_000;
        let day = 24 * 3600;
        assert!(!waited_too_long(posted, posted));
        assert!(!waited_too_long(posted, posted + 29 * day));
        assert!(!waited_too_long(posted, posted + 30 * day - 1));
        assert!(waited_too_long(posted, posted + 30 * day));
        assert!(
            !waited_too_long(posted + day, posted),
            "posted in the future"
        );
    }
}
