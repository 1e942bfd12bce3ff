//! API v1 of the repository: the JSON bodies and header names that server and client
//! share, so the two cannot drift apart. `docs/repository-api.yaml` describes the same.
//!
//! | method + path                          | who       | what                          |
//! |----------------------------------------|-----------|-------------------------------|
//! | `POST /v1/documents`                   | facility  | [`NewDocument`] -> [`Created`] |
//! | `GET /v1/documents/{id}`               | facility  | [`DocumentStatus`]            |
//! | `PUT /v1/documents/{id}/parts/{n}`     | facility  | part bytes                    |
//! | `POST /v1/documents/{id}/complete`     | facility  | [`Complete`] -> status        |
//! | `DELETE /v1/documents/{id}`            | facility  | revoke -> status              |
//! | `PATCH /v1/documents/{id}`             | facility  | [`Extend`] -> status          |
//! | `GET /v1/documents/{id}/content`       | receiver  | bytes (Range), [`PROOF_HEADER`]; answers [`FACILITY_HEADER`] |
//! | `POST /v1/documents/{id}/receipts`     | receiver  | [`Receipt`], [`PROOF_HEADER`] |
//! | `GET /v1/facilities/{code}`            | facility  | [`FacilityEntry`]             |
//! | `POST /v1/mailboxes/{recipient}/messages` | facility (sender) | sealed bytes -> [`Posted`] |
//! | `GET /v1/mailbox/messages`             | facility (recipient) | `Vec<`[`MessageInfo`]`>` |
//! | `GET /v1/mailbox/messages/{id}`        | facility (recipient) | sealed bytes, [`MESSAGE_SENDER_HEADER`] |
//! | `DELETE /v1/mailbox/messages/{id}`     | facility (recipient) | 204 (also when absent) |
//!
//! The mailbox routes without a facility in the path always mean the caller's own
//! mailbox: no facility can name another's.
//!
//! Every refusal is an [`ErrorBody`] with a stable [`ErrorBody::error`] code.

use serde::{Deserialize, Serialize};

/// Header carrying the download proof (64 hex digits); never in the URL, which proxies log.
pub const PROOF_HEADER: &str = "x-download-proof";
/// Header carrying the SHA-256 (hex) of the whole ciphertext on downloads, so the
/// receiver can check what it assembled from resumed pieces.
pub const SHA256_HEADER: &str = "x-content-sha256";
/// Header carrying, on downloads of a document completed with [`Complete::Parts`], the
/// [`parts_digest`] (hex) of its parts, instead of [`SHA256_HEADER`].
pub const PARTS_SHA256_HEADER: &str = "x-content-parts-sha256";
/// Header carrying, with [`PARTS_SHA256_HEADER`], the part size (bytes) the digest is
/// computed over: every part but the last has exactly this size.
pub const PART_SIZE_HEADER: &str = "x-content-part-size";
/// Header naming, on downloads, the facility that created the document (its code in the
/// repository's configuration): the receiver's issuer, since the token carries none.
pub const FACILITY_HEADER: &str = "x-document-facility";
/// Longest free-text note accepted in a receipt (bytes).
pub const MAX_NOTE_LEN: usize = 200;
/// Header naming the facility that posted a mailbox message (its code, as the
/// repository authenticated it).
pub const MESSAGE_SENDER_HEADER: &str = "x-message-sender";
/// Largest mailbox message (bytes): one sealed token ([`crate::facility::seal::MAX_SEALED`]).
pub const MAX_MESSAGE_LEN: usize = crate::facility::seal::MAX_SEALED;
/// Messages waiting in one mailbox at most; a post beyond is answered 429
/// [`MAILBOX_FULL`] until the recipient fetches and deletes some.
pub const MAX_MAILBOX_MESSAGES: usize = 1000;
/// Messages listed by one call at most (the oldest first); the recipient deletes what it
/// imported and lists again.
pub const MAX_LISTED_MESSAGES: usize = 100;
/// Length of a message ID: 80 bits as lower-case hex.
pub const MESSAGE_ID_LEN: usize = 20;
/// Error code of a post to a mailbox that holds [`MAX_MAILBOX_MESSAGES`] messages.
pub const MAILBOX_FULL: &str = "mailbox_full";

/// Whether `id` has the exact form of a message ID, so nothing else ever reaches a
/// storage path.
pub fn is_message_id(id: &str) -> bool {
    id.len() == MESSAGE_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a sending facility asks for when it creates a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDocument {
    /// Exact size of the ciphertext in bytes; `None` for a streamed document, whose size
    /// is fixed by its completion ([`Complete::Parts`]): the sender does not know it
    /// before the last part is produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// When the document expires, Unix seconds (UTC); the token's expiry.
    pub expires_at: u64,
    /// How many downloads are allowed (a resumed download counts once).
    pub max_downloads: u32,
    /// SHA-256 of the download proof: all the repository learns of the token.
    #[serde(with = "hex32")]
    pub proof_hash: [u8; 32],
}

/// The server's answer to a create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The unguessable ID to put in the token.
    pub document_id: String,
    /// Size of every part but the last (bytes).
    pub part_size: u64,
    /// Number of parts to upload, numbered from 0; 0 for a streamed document (unknown
    /// until it is complete: each part but the last is exactly `part_size` bytes).
    pub parts: u32,
}

/// Where a document is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Created, parts arriving.
    Uploading,
    /// Every part held and the hash checked: downloadable.
    Complete,
    /// Revoked by the sender; content deleted.
    Revoked,
    /// Past its expiry; content deleted (or about to be, by the sweep).
    Expired,
}

/// What a sending facility asks for when it extends a document's expiry (a token
/// re-issued with a later date for a patient who could not hand the slip over in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    /// The new expiry, Unix seconds (UTC): later than the current one, at most
    /// `server.max_expiry_days` from now.
    pub expires_at: u64,
}

/// Error code of an extend whose expiry is not later than the current one, or beyond the
/// repository's limit (the same code a create with a wrong expiry gets).
pub const INVALID_EXPIRY: &str = "invalid_expiry";

/// Extensions of one document's expiry at most: each is a record the status, part and
/// download handlers list, so a facility key cannot grow a document's records without
/// bound; beyond, the extend is refused with [`TOO_MANY_EXTENSIONS`] (send the study
/// again for a new token).
pub const MAX_EXTENSIONS: u32 = 16;

/// Error code (409) of an extend of a document extended [`MAX_EXTENSIONS`] times already.
pub const TOO_MANY_EXTENSIONS: &str = "too_many_extensions";

/// Error code (410) of an extend of a document that was revoked, or expired (its content
/// deleted): nothing can bring it back.
pub const GONE: &str = "gone";

/// A receipt the receiver sends after importing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Instances stored into the receiving PACS.
    pub instances_imported: u64,
    /// Instances the receiving PACS refused.
    #[serde(default)]
    pub instances_refused: u64,
    /// Short free text for the sender (no patient data), at most [`MAX_NOTE_LEN`] bytes.
    #[serde(default)]
    pub note: String,
    /// The receiving facility's code, when it received the token by sealed delivery: the
    /// sender's status shows which recipient imported it; `None` for a token handed over
    /// otherwise (a patient's slip must not tell where the patient went). At most
    /// [`crate::facility::MAX_CODE_LEN`] characters of `A-Z a-z 0-9 _ -`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facility: Option<String>,
}

/// A receipt as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    /// When the repository received it, Unix seconds.
    pub received_at: u64,
    /// What the receiver reported.
    #[serde(flatten)]
    pub receipt: Receipt,
}

/// What the sender sees of its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentStatus {
    /// The document ID.
    pub document_id: String,
    /// Life-cycle state.
    pub state: State,
    /// Size in bytes: the declared one, or for a streamed document the one its
    /// completion fixed (0 while it uploads).
    pub size: u64,
    /// Size of every part but the last.
    pub part_size: u64,
    /// Numbers of the parts held, ascending: an interrupted upload sends the others.
    pub parts_held: Vec<u32>,
    /// SHA-256 (hex) of the ciphertext, once complete with [`Complete::Whole`].
    pub sha256: Option<String>,
    /// [`parts_digest`] (hex) of the parts, once complete with [`Complete::Parts`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts_sha256: Option<String>,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Downloads allowed.
    pub max_downloads: u32,
    /// Downloads started so far.
    pub downloads: u32,
    /// Receipts from receivers, oldest first.
    pub receipts: Vec<ReceiptRecord>,
}

/// The body of a complete call, in one of two forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Complete {
    /// The whole-ciphertext SHA-256 (the first form, kept for older clients): the server
    /// reads every part back to check it.
    Whole(WholeHash),
    /// The size and the [`parts_digest`]: the server checks it against the per-part hashes
    /// it recorded as the parts arrived, reading no content (O(parts) small reads).
    Parts(PartsHash),
}

/// [`Complete::Whole`]: `{"sha256": hex}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WholeHash {
    /// SHA-256 of the whole ciphertext, as the uploader computed it.
    #[serde(with = "hex32")]
    pub sha256: [u8; 32],
}

/// [`Complete::Parts`]: `{"size": N, "parts_sha256": hex}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartsHash {
    /// Size of the whole ciphertext in bytes (fixes a streamed document's size).
    pub size: u64,
    /// [`parts_digest`] of the parts, in part order.
    #[serde(with = "hex32")]
    pub parts_sha256: [u8; 32],
}

/// The digest a [`Complete::Parts`] names: SHA-256 over the 32-byte SHA-256 of each part,
/// in part order. One function for server and client, so the two cannot drift apart.
pub fn parts_digest(part_hashes: &[[u8; 32]]) -> [u8; 32] {
    use sha2::Digest;
    let mut outer = sha2::Sha256::new();
    for hash in part_hashes {
        outer.update(hash);
    }
    outer.finalize().into()
}

/// A facility in the repository's directory: what a sender seals to, after checking the
/// key's fingerprint against its pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityEntry {
    /// The facility code.
    pub code: String,
    /// Its name, for people.
    pub name: String,
    /// Its public key, `x25519:` + base64url ([`crate::facility::PublicKey::parse`]).
    pub public_key: String,
}

/// The answer to a post: the message's ID in the recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    /// [`MESSAGE_ID_LEN`] hex digits, derived from the sender, the recipient and the
    /// sealed bytes: posting the same bytes again (a retry) gives the same message.
    pub message_id: String,
}

/// A message waiting in the caller's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Its ID, to fetch and delete it.
    pub message_id: String,
    /// The facility that posted it, as the repository authenticated it.
    pub sender: String,
    /// Size of the sealed bytes.
    pub size: u64,
    /// When it was posted, Unix seconds.
    pub posted_at: u64,
}

/// Every refusal: a stable machine code and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code, e.g. `not_available`, `unauthorized`, `too_large`.
    pub error: String,
    /// What happened and what to do, without any secret.
    pub message: String,
}

/// Error code of a download or receipt that cannot be served: wrong proof, unknown ID,
/// expired, revoked or out of downloads all answer this, alike.
pub const NOT_AVAILABLE: &str = "not_available";

/// Serde for 32-byte values as 64 lower-case hex digits.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Writes the bytes as hex.
    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Reads exactly 64 hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| D::Error::custom("expected 64 hex digits"))
    }

    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(out)
    }

    /// The same for an optional value (absent or `null` is `None`).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        /// Writes the bytes as hex, or `null`.
        pub fn serialize<S: Serializer>(bytes: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(bytes) => super::serialize(bytes, s),
                None => s.serialize_none(),
            }
        }

        /// Reads exactly 64 hex digits, or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(text) => super::parse(&text)
                    .map(Some)
                    .ok_or_else(|| D::Error::custom("expected 64 hex digits")),
                None => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_strict() {
        assert!(is_message_id("0123456789abcdef0123"));
        for bad in [
            "",
            "..",
            "0123456789ABCDEF0123",
            "0123456789abcdef012/",
            "0123456789abcdef01234",
            "0123456789abcdef012",
            "%2e%2e",
        ] {
            assert!(!is_message_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn receipts_name_the_facility_only_when_known() {
        let receipt = Receipt {
            instances_imported: 3,
            instances_refused: 0,
            note: String::new(),
            facility: None,
        };
        let json = serde_json::to_string(&receipt).expect("serialize");
        assert!(!json.contains("facility"), "{json}");
        let named = Receipt {
            facility: Some("B".into()),
            ..receipt
        };
        let json = serde_json::to_string(&named).expect("serialize");
        assert_eq!(
            serde_json::from_str::<Receipt>(&json).expect("parse"),
            named
        );
    }

    #[test]
    fn new_document_round_trips_and_refuses_bad_hash() {
        let doc = NewDocument {
            size: Some(5),
            expires_at: 7,
            max_downloads: 1,
            proof_hash: [0xab; 32],
        };
        let json = serde_json::to_string(&doc).expect("serialize");
        assert!(json.contains(&"ab".repeat(32)));
        assert_eq!(
            serde_json::from_str::<NewDocument>(&json).expect("parse"),
            doc
        );
        let short = json.replace(&"ab".repeat(32), "abcd");
        assert!(serde_json::from_str::<NewDocument>(&short).is_err());
        let extra = json.replace('}', ",\"x\":1}");
        assert!(serde_json::from_str::<NewDocument>(&extra).is_err());
        let streamed = NewDocument { size: None, ..doc };
        let json = serde_json::to_string(&streamed).expect("serialize");
        assert!(!json.contains("size"), "{json}");
        assert_eq!(
            serde_json::from_str::<NewDocument>(&json).expect("parse"),
            streamed
        );
    }

    #[test]
    fn both_complete_forms_parse_and_mixtures_do_not() {
        let hex = "cd".repeat(32);
        let whole: Complete =
            serde_json::from_str(&format!("{{\"sha256\":\"{hex}\"}}")).expect("whole");
        assert_eq!(whole, Complete::Whole(WholeHash { sha256: [0xcd; 32] }));
        let parts: Complete =
            serde_json::from_str(&format!("{{\"size\":9,\"parts_sha256\":\"{hex}\"}}"))
                .expect("parts");
        assert_eq!(
            parts,
            Complete::Parts(PartsHash {
                size: 9,
                parts_sha256: [0xcd; 32]
            })
        );
        for bad in [
            format!("{{\"sha256\":\"{hex}\",\"size\":9}}"),
            format!("{{\"parts_sha256\":\"{hex}\"}}"),
            format!("{{\"size\":9,\"parts_sha256\":\"{hex}\",\"sha256\":\"{hex}\"}}"),
        ] {
            assert!(serde_json::from_str::<Complete>(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parts_digest_is_the_hash_of_the_part_hashes() {
        use sha2::Digest;
        let a: [u8; 32] = sha2::Sha256::digest(b"part 0").into();
        let b: [u8; 32] = sha2::Sha256::digest(b"part 1").into();
        let mut joined = a.to_vec();
        joined.extend_from_slice(&b);
        let expected: [u8; 32] = sha2::Sha256::digest(&joined).into();
        assert_eq!(parts_digest(&[a, b]), expected);
        assert_ne!(parts_digest(&[b, a]), expected);
    }
}
