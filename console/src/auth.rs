//! Who may use the console: a superuser of the reference host, by one of its
//! API tokens (`Authorization: Token <key>`, the host's scheme; keys are looked
//! up by their SHA-256 hash in the host's store, by the host's rule:
//! [`store::Store::authenticate`]).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::{ConsoleError, ConsoleState};

/// A superuser with an active token: every route of the API takes one.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    /// The user's name (audit records name it).
    pub(crate) username: String,
}

impl Admin {
    /// The actor of audit records: `console:<username>`.
    pub(crate) fn actor(&self) -> String {
        format!("console:{}", self.username)
    }
}

impl FromRequestParts<ConsoleState> for Admin {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ConsoleState,
    ) -> Result<Self, Self::Rejection> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(ConsoleError::Unauthenticated(
                "authentication required: send 'Authorization: Token <key>' (a superuser's API token of the host)"
                    .into(),
            ));
        };
        let key = header
            .to_str()
            .map_err(|_| store::TokenRefused::Malformed)
            .and_then(store::token_key)
            .map_err(|e| ConsoleError::Unauthenticated(e.to_string()))?;
        let found = state
            .inner
            .store
            .authenticate(key)
            .await?
            .map_err(|e| ConsoleError::Unauthenticated(e.to_string()))?;
        if !found.user.is_superuser {
            return Err(ConsoleError::Forbidden(format!(
                "the console needs a superuser; user '{}' is not one",
                found.user.username
            )));
        }
        Ok(Admin {
            username: found.user.username,
        })
    }
}
