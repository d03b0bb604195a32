//! Who makes a request: [`AuthUser`] (a valid token) or [`MaybeUser`]; read from
//! `Authorization: Token <key>` in [`super::auth`].

use core_events::User;

use super::error::ApiError;

/// The authenticated user of a request (401 `not_authenticated` without a valid token).
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// The user.
    pub user: User,
    /// The id of the token used (the key of per-token rate limits).
    pub token_id: i64,
}

/// The authenticated user, if the request has a valid token (an invalid one is still 401).
#[derive(Debug, Clone)]
pub struct MaybeUser(pub Option<AuthUser>);

impl AuthUser {
    /// 403 unless the user is a superuser.
    ///
    /// # Errors
    ///
    /// [`ApiError::Forbidden`] naming `what` needs a superuser.
    pub fn require_superuser(&self, what: &str) -> Result<(), ApiError> {
        if self.user.is_superuser {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{what} needs a superuser; user '{}' is not one",
                self.user.username
            )))
        }
    }
}
