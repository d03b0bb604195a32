//! What a host keeps for a few seconds so most requests cost no database read:
//! the users of recently seen token keys ([`TokenCache`]) and entities recently
//! read for entry writes ([`EntityCache`]). Both are dropped at once on a change,
//! in every host ([`super::forget`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use core_events::Entity;

use super::user::AuthUser;

/// How long a key's user is cached after a database lookup.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);

/// Most keys the cache holds; it is cleared when full (a flood of bad keys is
/// not cached at all: only keys that authenticate are).
const TOKEN_CACHE_MAX: usize = 10_000;

/// Users of recently seen keys, by key hash, each kept for [`TOKEN_CACHE_TTL`].
///
/// Every `forget_*` bumps a generation; a lookup started before it (which may
/// have read the user as it was) is then not cached, so a revoke or a user
/// change is never undone by a request that raced it.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, (AuthUser, Instant)>>,
    generation: AtomicU64,
}

impl TokenCache {
    /// The generation to pass to [`put`](Self::put): read before the database lookup.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(super) fn get(&self, hash: &str) -> Option<AuthUser> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < TOKEN_CACHE_TTL)
            .map(|(user, _)| user.clone())
    }

    /// Caches `user` unless something was forgotten since `generation` was read.
    pub(super) fn put(&self, hash: String, user: AuthUser, generation: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
            if entries.len() >= TOKEN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(hash, (user, Instant::now()));
    }

    /// Forgets a token (after it is revoked) so its key stops working at once.
    pub fn forget_token(&self, token_id: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.retain(|_, (user, _)| user.token_id != token_id);
    }

    /// Forgets every token of a user (after the user changed).
    pub fn forget_user(&self, user_id: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.retain(|_, (user, _)| user.user.id != user_id);
    }
}

/// How long an entity read for an entry write is reused (entity writes drop it
/// at once, in every host: [`super::forget`]).
pub const ENTITY_CACHE_TTL: Duration = Duration::from_secs(2);

/// Active entities recently read for entry writes, so creating an entry does not
/// read its entity twice. The store re-reads the entity inside the write's
/// transaction, so values are always checked against the entity as it is; only
/// what hooks see may lag an entity change made by another host process that
/// did not reach this one by NATS ([`super::forget`]) by at most [`ENTITY_CACHE_TTL`].
#[derive(Debug, Default)]
pub struct EntityCache {
    entries: Mutex<HashMap<i64, (Arc<Entity>, Instant)>>,
}

impl EntityCache {
    pub(super) fn get(&self, id: i64) -> Option<Arc<Entity>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&id)
            .filter(|(_, at)| at.elapsed() < ENTITY_CACHE_TTL)
            .map(|(e, _)| Arc::clone(e))
    }

    pub(super) fn put(&self, entity: Arc<Entity>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= 10_000 {
            entries.clear();
        }
        entries.insert(entity.id, (entity, Instant::now()));
    }

    /// Drops an entity (after it changed).
    pub fn forget(&self, id: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&id);
    }
}
