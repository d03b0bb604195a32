//! Authentication (`Authorization: Token <key>`, keys stored as SHA-256 hashes),
//! and the users and tokens endpoints.
//!
//! A key is hashed and looked up once; the user is then kept in [`TokenCache`]
//! for [`TOKEN_CACHE_TTL`], so most requests cost no database read. Revoking a
//! token, or changing or deactivating a user, drops it from the cache at once
//! (a lookup that raced the change is not cached either), in this host and, by
//! a notice over NATS ([`super::forget`]), in every other host process; one
//! that missed the notice drops it within the TTL.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /api/v2/users/me/` | any user | the caller |
//! | `GET /api/v2/users/` | superuser | users (`?limit=&offset=`) |
//! | `POST /api/v2/users/` | superuser | create a user |
//! | `GET /api/v2/users/<id>/` | superuser, or the user itself | a user |
//! | `PUT`/`PATCH /api/v2/users/<id>/` | superuser | change a user (audited `user.update`) |
//! | `DELETE /api/v2/users/<id>/` | superuser | deactivate a user (audited `user.deactivate`) |
//! | `GET /api/v2/tokens/` | any user | own tokens (a superuser may pass `?user_id=`) |
//! | `POST /api/v2/tokens/` | any user | create a token; the key is in the reply, once |
//! | `DELETE /api/v2/tokens/<id>/` | owner or superuser | revoke |

use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use core_events::User;
use serde_json::{Value, json};
use store::{ApiToken, NewUser, hash_key};

pub use super::cache::TOKEN_CACHE_TTL;
use super::error::ApiError;
use super::request::{Body, Page, Params, TokenId, UserId, parse_id};
use super::state::HostState;
pub use super::user::{AuthUser, MaybeUser};

impl FromRequestParts<HostState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HostState,
    ) -> Result<Self, Self::Rejection> {
        match MaybeUser::from_request_parts(parts, state).await?.0 {
            Some(user) => Ok(user),
            None => Err(ApiError::Unauthenticated(
                "authentication required: send 'Authorization: Token <key>'".into(),
            )),
        }
    }
}

impl FromRequestParts<HostState> for MaybeUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HostState,
    ) -> Result<Self, Self::Rejection> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(MaybeUser(None));
        };
        let key = header
            .to_str()
            .map_err(|_| store::TokenRefused::Malformed)
            .and_then(store::token_key)
            .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        authenticate(state, key).await.map(|u| MaybeUser(Some(u)))
    }
}

/// The user of `key`, from the cache or the store.
async fn authenticate(state: &HostState, key: &str) -> Result<AuthUser, ApiError> {
    let hash = hash_key(key);
    if let Some(user) = state.tokens.get(&hash) {
        return Ok(user);
    }
    let generation = state.tokens.generation();
    let found = state
        .store
        .authenticate(key)
        .await?
        .map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
    let user = AuthUser {
        user: found.user,
        token_id: found.token_id,
    };
    state.tokens.put(hash, user.clone(), generation);
    // Recorded at most once per cache period; a failure only loses the timestamp.
    let store = state.store.clone();
    let token_id = user.token_id;
    tokio::spawn(async move {
        if let Err(e) = store.touch_token(token_id).await {
            tracing::debug!(error = %e, token_id, "cannot record token use");
        }
    });
    Ok(user)
}

pub(crate) fn routes() -> Router<HostState> {
    Router::new()
        .route("/api/v2/users/me/", get(me))
        .route("/api/v2/users/", get(list_users).post(create_user))
        .route(
            "/api/v2/users/{id}/",
            get(get_user)
                .put(update_user)
                .patch(update_user)
                .delete(deactivate_user),
        )
        .route("/api/v2/tokens/", get(list_tokens).post(create_token))
        .route("/api/v2/tokens/{id}/", delete(revoke_token))
}

async fn me(auth: AuthUser) -> Json<User> {
    Json(auth.user)
}

async fn list_users(
    State(state): State<HostState>,
    auth: AuthUser,
    Params(query): Params,
) -> Result<Json<Value>, ApiError> {
    auth.require_superuser("listing users")?;
    let page = Page::from_query(&query)?;
    let users = state.store.list_users(page.limit, page.offset).await?;
    Ok(Json(page.wrap(users)))
}

async fn create_user(
    State(state): State<HostState>,
    auth: AuthUser,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    auth.require_superuser("creating users")?;
    let mut f = body.fields();
    let new = NewUser {
        username: f.required("username").unwrap_or_default(),
        email: f.optional("email").unwrap_or_default(),
        first_name: f.optional("first_name").unwrap_or_default(),
        last_name: f.optional("last_name").unwrap_or_default(),
        is_superuser: f.optional("is_superuser").unwrap_or_default(),
    };
    f.finish()?;
    let user = state.store.create_user(&new).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn get_user(
    State(state): State<HostState>,
    auth: AuthUser,
    UserId(id): UserId,
) -> Result<Json<User>, ApiError> {
    if id != auth.user.id {
        auth.require_superuser("reading another user")?;
    }
    Ok(Json(state.store.user(id).await?))
}

/// `PUT`/`PATCH /api/v2/users/<id>/`: a partial change; absent fields stay.
async fn update_user(
    State(state): State<HostState>,
    auth: AuthUser,
    UserId(id): UserId,
    body: Body,
) -> Result<Json<User>, ApiError> {
    auth.require_superuser("changing a user")?;
    let mut f = body.fields();
    let username: Option<String> = f.optional("username");
    let email: Option<String> = f.optional("email");
    let first_name: Option<String> = f.optional("first_name");
    let last_name: Option<String> = f.optional("last_name");
    let is_superuser: Option<bool> = f.optional("is_superuser");
    let is_active: Option<bool> = f.optional("is_active");
    f.finish()?;
    let (before, after) = state
        .store
        .update_user(id, move |u| {
            if let Some(v) = username {
                u.username = v;
            }
            if let Some(v) = email {
                u.email = v;
            }
            if let Some(v) = first_name {
                u.first_name = v;
            }
            if let Some(v) = last_name {
                u.last_name = v;
            }
            if let Some(v) = is_superuser {
                u.is_superuser = v;
            }
            if let Some(v) = is_active {
                u.is_active = v;
            }
        })
        .await?;
    let changes = user_changes(&before, &after);
    if !changes.is_empty() {
        // Its cached tokens carry the old user (name, superuser, active).
        state.forget(super::forget::Forget::User(id)).await;
        audit_user(
            &state,
            "user.update",
            &auth,
            &after,
            json!({"user_id": id, "username": after.username, "changes": changes}),
        )
        .await;
    }
    Ok(Json(after))
}

/// `DELETE /api/v2/users/<id>/`: deactivates the user (soft: the row and its
/// tokens stay, its keys stop authenticating at once; `PUT {"is_active": true}`
/// brings it back). Idempotent, like revoking a token: deactivating an
/// inactive user answers 200 with the user and records nothing.
async fn deactivate_user(
    State(state): State<HostState>,
    auth: AuthUser,
    UserId(id): UserId,
) -> Result<Json<User>, ApiError> {
    auth.require_superuser("deactivating a user")?;
    let (before, after) = state.store.update_user(id, |u| u.is_active = false).await?;
    if before.is_active {
        state.forget(super::forget::Forget::User(id)).await;
        audit_user(
            &state,
            "user.deactivate",
            &auth,
            &after,
            json!({"user_id": id, "username": after.username}),
        )
        .await;
    }
    Ok(Json(after))
}

/// The fields that differ: `{field: {"from": …, "to": …}}`.
fn user_changes(before: &User, after: &User) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let mut field = |name: &str, from: Value, to: Value| {
        if from != to {
            out.insert(name.to_owned(), json!({"from": from, "to": to}));
        }
    };
    field("username", json!(before.username), json!(after.username));
    field("email", json!(before.email), json!(after.email));
    field(
        "first_name",
        json!(before.first_name),
        json!(after.first_name),
    );
    field("last_name", json!(before.last_name), json!(after.last_name));
    field(
        "is_superuser",
        json!(before.is_superuser),
        json!(after.is_superuser),
    );
    field("is_active", json!(before.is_active), json!(after.is_active));
    out
}

/// Records a user action in the audit trail (`PAGODA_AUDIT`); a failure is logged.
async fn audit_user(state: &HostState, action: &str, auth: &AuthUser, user: &User, details: Value) {
    hookbus::audit::record_or_log(
        &state.js,
        &state.subjects,
        &hookbus::audit::AuditEvent::new(
            action,
            auth.user.username.clone(),
            format!("user {}", user.id),
            details,
        ),
        None,
    )
    .await;
}

async fn list_tokens(
    State(state): State<HostState>,
    auth: AuthUser,
    Params(query): Params,
) -> Result<Json<Value>, ApiError> {
    let user_id = match query.get("user_id") {
        Some(id) => {
            let id = parse_id("user_id", id)?;
            if id != auth.user.id {
                auth.require_superuser("listing another user's tokens")?;
            }
            id
        }
        None => auth.user.id,
    };
    let tokens = state.store.tokens_of(user_id).await?;
    Ok(Json(json!({ "count": tokens.len(), "results": tokens })))
}

async fn create_token(
    State(state): State<HostState>,
    auth: AuthUser,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let mut f = body.fields();
    let name: String = f.optional("name").unwrap_or_default();
    let user_id: Option<i64> = f.optional("user_id");
    f.finish()?;
    let user_id = match user_id {
        Some(id) if id != auth.user.id => {
            auth.require_superuser("creating a token for another user")?;
            id
        }
        _ => auth.user.id,
    };
    let (token, key) = state.store.create_token(user_id, &name).await?;
    audit(
        &state,
        "token.create",
        &auth,
        &token,
        json!({"token_id": token.id, "user_id": user_id, "name": name}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(token_with_key(&token, &key))))
}

/// Records a token action in the audit trail (`PAGODA_AUDIT`); a failure is logged.
async fn audit(state: &HostState, action: &str, auth: &AuthUser, token: &ApiToken, details: Value) {
    hookbus::audit::record_or_log(
        &state.js,
        &state.subjects,
        &hookbus::audit::AuditEvent::new(
            action,
            auth.user.username.clone(),
            format!("token {} of user {}", token.id, token.user_id),
            details,
        ),
        None,
    )
    .await;
}

fn token_with_key(token: &ApiToken, key: &str) -> Value {
    let mut v = serde_json::to_value(token).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("key".into(), Value::String(key.to_owned()));
    }
    v
}

async fn revoke_token(
    State(state): State<HostState>,
    auth: AuthUser,
    TokenId(id): TokenId,
) -> Result<Json<ApiToken>, ApiError> {
    let token = state.store.token(id).await?;
    if token.user_id != auth.user.id && !auth.user.is_superuser {
        // Someone else's token is as good as none to a normal user.
        return Err(ApiError::NotFound(format!("token {id} not found")));
    }
    let (token, revoked) = state.store.revoke_token_once(id).await?;
    // Revoking a revoked token answers the same, and records nothing.
    if revoked {
        state.forget(super::forget::Forget::Token(id)).await;
        audit(
            &state,
            "token.revoke",
            &auth,
            &token,
            json!({"token_id": token.id, "user_id": token.user_id}),
        )
        .await;
    }
    Ok(Json(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::TokenCache;

    fn auth_user(user_id: i64, token_id: i64) -> AuthUser {
        AuthUser {
            user: User {
                id: user_id,
                username: format!("u{user_id}"),
                email: String::new(),
                first_name: String::new(),
                last_name: String::new(),
                is_active: true,
                is_superuser: false,
                date_joined: chrono::Utc::now(),
            },
            token_id,
        }
    }

    #[test]
    fn forgetting_drops_cached_users_and_lookups_that_raced_it() {
        let cache = TokenCache::default();
        let g = cache.generation();
        cache.put("a".into(), auth_user(1, 10), g);
        cache.put("b".into(), auth_user(2, 20), g);
        assert_eq!(cache.get("a").map(|u| u.token_id), Some(10));

        // A lookup that started before the user changed is not cached.
        let before = cache.generation();
        cache.forget_user(1);
        assert!(cache.get("a").is_none());
        assert_eq!(cache.get("b").map(|u| u.token_id), Some(20));
        cache.put("a".into(), auth_user(1, 10), before);
        assert!(
            cache.get("a").is_none(),
            "a stale lookup must not be cached"
        );
        cache.put("a".into(), auth_user(1, 10), cache.generation());
        assert!(cache.get("a").is_some());

        cache.forget_token(20);
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
    }
}
