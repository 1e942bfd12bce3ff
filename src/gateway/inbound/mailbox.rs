//! The mailbox: tokens other facilities sealed to this one and posted to its mailbox in
//! the repository become inbound jobs, as if dropped into the watch folder.
//!
//! Every `inbound.mailbox_poll_interval` seconds the task lists the mailbox (this
//! facility's API key: the repository shows a facility only its own mailbox) and, for each
//! message, oldest first:
//! 1. the sender, authenticated by the repository, must be in `inbound.accept_from`;
//! 2. its key, looked up in the repository's directory, must have the fingerprint pinned
//!    in `[facilities.SENDER]`;
//! 3. the message must open with this facility's key as sealed by that sender to this
//!    facility (HPKE authenticated mode), and hold a token;
//! 4. the token is queued durably (the job folder and record are flushed), issuer = sender;
//! 5. only then is the message deleted from the mailbox.
//!
//! A crash anywhere before 5 leaves the message in the mailbox: the next poll takes it
//! again, and since the job's ID is derived from the token, a second queueing finds the
//! job and only deletes the message. A message refused at 1-4 (other than for a local
//! failure, retried at the next poll) is recorded per sender for `cloudpdi status`, logged
//! once, then deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
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
use crate::repository::client::{Client, ClientOptions};
use crate::token::Token;

/// A sending facility whose sealed tokens were refused: the last reason and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The sender's facility code (as the repository authenticated it).
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
    /// A failure here or at the repository: leave it for the next poll.
    Later(String),
}

/// The mailbox task of the daemon.
pub struct Mailbox {
    inbound: Arc<Inbound>,
    client: Client,
    key: Arc<FacilityKey>,
    /// This facility's code, to which senders seal.
    code: String,
    /// `inbound.accept_from`, each with its pinned fingerprint.
    accepted: BTreeMap<String, Fingerprint>,
    poll: Duration,
}

impl Mailbox {
    /// The mailbox of this facility in the repository of `[repository]`, read with its
    /// API key, for the senders of `inbound.accept_from`.
    ///
    /// # Errors
    /// A sentence naming the key to fix: the API key file cannot be read, or a pin does
    /// not parse (the configuration check refuses both before).
    pub fn new(
        config: &Config,
        inbound: Arc<Inbound>,
        key: Arc<FacilityKey>,
    ) -> Result<Mailbox, String> {
        let key_file = &config.repository.api_key_file;
        let api_key = std::fs::read_to_string(key_file).map_err(|e| {
            format!(
                "inbound.accept_from: cannot read the repository API key from {} ({e}): set \
                 repository.api_key_file and restart the daemon",
                key_file.display()
            )
        })?;
        let options = ClientOptions {
            allow_plain_http: config.repository.allow_plain_http,
            plain_http_key: "repository.allow_plain_http",
            ..ClientOptions::default()
        };
        let client = Client::new(
            config.repository.url.trim_end_matches('/'),
            Some(api_key.trim().to_owned()),
            options,
        )
        .map_err(|e| format!("inbound.accept_from: {e}"))?;
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
            key,
            code: config.facility.code.clone(),
            accepted,
            poll: Duration::from_secs(config.inbound.mailbox_poll_interval.max(1)),
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
        for message in self.client.messages().await? {
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
                Outcome::Later(reason) => {
                    warn!(message = %id, from = %message.sender, "sealed token not taken yet (will retry): {reason}");
                }
            }
        }
        Ok(())
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
                return Outcome::Refused(format!(
                    "the repository's directory has no key for facility {sender} ({e}): ask \
                     the repository operator"
                ));
            }
            Err(e) => return Outcome::Later(e.to_string()),
        };
        let public = match PublicKey::parse(&entry.public_key) {
            Ok(public) => public,
            Err(e) => {
                return Outcome::Refused(format!(
                    "the repository's directory gives facility {sender} a key this gateway \
                     cannot read ({e}): tell the repository operator"
                ));
            }
        };
        let found = public.fingerprint();
        if found != *pinned {
            return Outcome::Refused(format!(
                "the repository's directory gives facility {sender} a key with fingerprint \
                 {found}, but facilities.{sender}.fingerprint pins {pinned}: call {sender} \
                 and compare the fingerprint of their key (`cloudpdi facility show`); if \
                 they changed it, pin the new one and restart the daemon, and ask them to \
                 send again"
            ));
        }
        let sealed = match self.client.message(&message.message_id).await {
            Ok(sealed) => sealed,
            Err(e) if e.is_permanent() => {
                return Outcome::Refused(format!("the repository did not give the message: {e}"));
            }
            Err(e) => return Outcome::Later(e.to_string()),
        };
        let opened = crate::facility::open(&self.key, &self.code, &public, sender, &sealed);
        let plaintext = match opened {
            Ok(plaintext) => plaintext,
            Err(e) => {
                return Outcome::Refused(format!(
                    "the message does not open as sealed by {sender} to {} ({e}): it was \
                     damaged or not sealed by {sender}'s key",
                    self.code
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
                return Outcome::Refused(format!(
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
            Ok(Err(e)) => Outcome::Refused(e.to_string()),
            Err(e) => Outcome::Later(e.to_string()),
        }
    }

    /// Records the refusal of `message` durably (logged when the message is new to the
    /// record: a message refused again after a failed delete is not logged twice).
    async fn refuse(&self, message: &MessageInfo, reason: &str) -> Result<(), String> {
        let inbound = self.inbound.clone();
        let (message, reason) = (message.clone(), reason.to_owned());
        let recorded = tokio::task::spawn_blocking(move || {
            let store = &inbound.refusals;
            let now = now_ms();
            let mut record = store.get::<Refusal>(&message.sender)?.unwrap_or(Refusal {
                sender: message.sender.clone(),
                reason: String::new(),
                messages: 0,
                first_at: now,
                last_at: now,
                last_message: String::new(),
            });
            if record.last_message == message.message_id {
                return Ok(());
            }
            record.messages = record.messages.saturating_add(1);
            record.last_at = now;
            record.reason = reason.clone();
            record.last_message = message.message_id.clone();
            store.put(&message.sender, &record)?;
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
