//! Password hashes: argon2id PHC strings, verified in constant time by the
//! argon2 crate. Login always verifies exactly one hash, a dummy one when
//! the email is unknown, so the answer takes the same time either way.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::policy::Policy;

thread_local! {
    /// argon2's working memory (`m_cost` KiB), kept by each thread that
    /// verifies: logins verify on a fixed set of threads (see
    /// `issue::bounds`), so the memory they hold is that set times
    /// `m_cost`, allocated once, not a fresh 19 MiB per login that the
    /// allocator may keep around in each thread's arena.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Whether `password` is the one `phc` (an argon2 PHC string) was made
/// from; the comparison is constant-time.
pub fn verify_password(phc: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let expected = expected.as_bytes();
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    let argon = Argon2::new(algorithm, version, params.clone());
    let hashed = MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        memory.resize(params.block_count(), Block::default());
        argon.hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..])
    });
    hashed.is_ok() && bool::from(subtle::ConstantTimeEq::ct_eq(&*out, expected))
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

/// The hash a login verifies when it names no user with a password, so
/// that every failed login costs the same: shaped like the policy's first
/// password hash, made once per shape (an argon2 run) and kept: the
/// proxy makes it before a policy serves, at boot and on reload. Empty —
/// nothing to verify — when no user has a password.
pub fn dummy_hash_for(policy: &Policy) -> Arc<str> {
    static MADE: Mutex<Vec<(String, Arc<str>)>> = Mutex::new(Vec::new());
    let Some(like) = policy.users.iter().find_map(|u| u.password_hash.as_deref()) else {
        return Arc::from("");
    };
    // `$argon2id$v=19$m=19456,t=2,p=1$salt$hash`: the shape is before the salt.
    let shape = like.splitn(5, '$').take(4).collect::<Vec<_>>().join("$");
    let made = |made: &Vec<(String, Arc<str>)>| {
        made.iter()
            .find(|(s, _)| *s == shape)
            .map(|(_, h)| h.clone())
    };
    if let Some(hash) = made(&MADE.lock().unwrap_or_else(|e| e.into_inner())) {
        return hash;
    }
    // Made outside the lock: two threads may both make one; one is kept.
    let hash: Arc<str> = Arc::from(dummy_hash_like(Some(like)));
    let mut all = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(hash) = made(&all) {
        return hash;
    }
    if all.len() >= 8 {
        all.remove(0);
    }
    all.push((shape, hash.clone()));
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn verifies_exactly_as_the_argon2_crate_does() {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        for (alg, params) in [
            (Algorithm::Argon2id, Params::new(64, 1, 1, None).unwrap()),
            (
                Algorithm::Argon2id,
                Params::new(256, 2, 2, Some(16)).unwrap(),
            ),
            (Algorithm::Argon2i, Params::new(128, 3, 1, None).unwrap()),
            (Algorithm::Argon2d, Params::new(96, 1, 3, Some(48)).unwrap()),
        ] {
            let argon = Argon2::new(alg, Version::V0x13, params);
            let phc = argon.hash_password(b"right", &salt).unwrap().to_string();
            let parsed = PasswordHash::new(&phc).unwrap();
            for guess in ["right", "wrong", "", "right "] {
                assert_eq!(
                    verify_password(&phc, guess),
                    Argon2::default()
                        .verify_password(guess.as_bytes(), &parsed)
                        .is_ok(),
                    "{phc} {guess:?}"
                );
            }
            assert!(verify_password(&phc, "right"));
        }
        for bad in [
            "",
            "$argon2id$",
            "plain",
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ",
        ] {
            assert!(!verify_password(bad, "x"), "{bad}");
        }
    }
}
