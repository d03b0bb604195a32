//! Cache invalidation across host processes.
//!
//! Each host caches token users ([`TokenCache`](super::cache::TokenCache)) and
//! entities ([`EntityCache`](super::cache::EntityCache)) for a few seconds. A
//! change made through one host (a token revoked, a user changed or
//! deactivated, an entity changed, deleted or restored) drops the entry from its
//! own cache at once and tells the others on `<prefix>.host.forget` (core NATS,
//! [`Subjects::host_forget`](core_events::Subjects::host_forget)), so they drop
//! it too. A host that misses the notice (disconnected at that moment) still
//! drops it when its cache entry expires.
//!
//! A notice is JSON: `{"origin": "<host instance>", "forget": {"token": 12}}`,
//! with `"user"` or `"entity"` instead of `"token"`.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::state::HostState;

/// What to drop from the caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forget {
    /// A token (revoked).
    Token(i64),
    /// Every token of a user (changed or deactivated).
    User(i64),
    /// An entity (changed, deleted or restored).
    Entity(i64),
}

#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    /// The host instance that sent it (which already forgot).
    origin: String,
    forget: Forget,
}

impl HostState {
    /// Drops `what` from this host's caches, then tells the other hosts.
    pub async fn forget(&self, what: Forget) {
        self.forget_here(what);
        let notice = Notice {
            origin: self.instance.clone(),
            forget: what,
        };
        let body = match serde_json::to_vec(&notice) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a cache notice");
                return;
            }
        };
        if let Err(e) = self
            .client
            .publish(self.subjects.host_forget(), body.into())
            .await
        {
            tracing::warn!(error = %e, ?what, "cannot tell other hosts to drop a cached entry; theirs expires within seconds");
        }
    }

    fn forget_here(&self, what: Forget) {
        match what {
            Forget::Token(id) => self.tokens.forget_token(id),
            Forget::User(id) => self.tokens.forget_user(id),
            Forget::Entity(id) => self.entities.forget(id),
        }
    }
}

/// Subscribes to the other hosts' notices (before the host serves, so none is
/// missed after start) and applies them until `shutdown`.
///
/// # Errors
///
/// When the subscription cannot be made.
pub(super) async fn listen(
    state: HostState,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    let mut notices = state.client.subscribe(state.subjects.host_forget()).await?;
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                msg = notices.next() => match msg {
                    Some(m) => m,
                    None => return,
                },
            };
            match serde_json::from_slice::<Notice>(&msg.payload) {
                Ok(n) if n.origin == state.instance => {}
                Ok(n) => state.forget_here(n.forget),
                Err(e) => tracing::warn!(
                    subject = %msg.subject,
                    error = %e,
                    "ignored a cache notice that is not {{\"origin\", \"forget\": {{\"token\"|\"user\"|\"entity\": id}}}}"
                ),
            }
        }
    }))
}
