//! Password hashes: argon2id PHC strings, verified in constant time by the
//! argon2 crate. Login always verifies exactly one hash, a dummy one when
//! the email is unknown, so the answer takes the same time either way.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

pub fn verify_password(phc: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// A hash of a random password with the same argon2 parameters as `like`
/// (or the defaults), so verifying it costs what verifying a real one does.
pub fn dummy_hash_like(like: Option<&str>) -> String {
    let params = like
        .and_then(|phc| PasswordHash::new(phc).ok())
        .and_then(|h| Params::try_from(&h).ok())
        .unwrap_or_default();
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let secret: [u8; 32] = rand::random();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(&secret, &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
}
