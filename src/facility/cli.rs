//! `cloudpdi facility keygen` and `cloudpdi facility show`: make this facility's key pair
//! and print what the repository operator registers (the public key) and what the other
//! facilities pin (its fingerprint, read over the phone).

use std::path::Path;

use super::key::{FacilityKey, KeyError};

/// What `keygen` and `show` print for the key in `path`: the public key for the
/// repository operator, the fingerprint for the other facilities.
fn describe(key: &FacilityKey, path: &Path) -> String {
    let public = key.public();
    format!(
        "private key: {} (keep it: mode 0600, never copy it)\n\
         public key:  {}\n\
         fingerprint: {}\n\
         \n\
         Send the public key to the repository operator (public_key of [facility.CODE] in\n\
         its repository.toml). Read the fingerprint to each facility that sends to you, on\n\
         the phone: they pin it as [facilities.CODE] fingerprint in their configuration.\n",
        path.display(),
        public.to_text(),
        public.fingerprint(),
    )
}

/// Makes a new key pair, writes the private key to the new file `out` (0600; an existing
/// file is never replaced) and returns what to print.
///
/// # Errors
/// [`KeyError`] when no randomness is available or the file exists or cannot be written.
pub fn keygen(out: &Path) -> Result<String, KeyError> {
    let key = FacilityKey::generate()?;
    key.save_new(out)?;
    Ok(describe(&key, out))
}

/// Reads the key file `key` and returns what `keygen` printed for it.
///
/// # Errors
/// [`KeyError`] when the file is not a private key file or others may read it.
pub fn show(key: &Path) -> Result<String, KeyError> {
    Ok(describe(&FacilityKey::load(key)?, key))
}
