//! The admin API described as OpenAPI 3.1, generated from the handlers' `#[utoipa::path]`
//! annotations and the types they take and answer; served at `/openapi.json`.

use crate::server::ErrorBody;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// The document as served.
pub fn document() -> String {
    <crate::server::ApiDoc as utoipa::OpenApi>::openapi()
        .to_json()
        .unwrap_or_else(|e| format!(r#"{{"error":"internal","message":"{e}"}}"#))
}

/// Adds the bearer scheme every admin call's `security` names.
#[derive(Debug)]
pub struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Answers of every admin call that a token does not pass.
#[derive(Debug, utoipa::IntoResponses)]
pub enum Denied {
    #[response(status = 401, description = "No valid admin token.")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "The token's role is too weak.")]
    Forbidden(ErrorBody),
}

/// Answers of a read of one stand that does not succeed.
#[derive(Debug, utoipa::IntoResponses)]
pub enum ReadFailed {
    #[response(
        status = 400,
        description = "A malformed request: unknown fields, bad values, bad JSON."
    )]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "No valid admin token.")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "The token's role is too weak.")]
    Forbidden(ErrorBody),
    #[response(
        status = 404,
        description = "The relay does not serve this stand (`unknown_stand`)."
    )]
    NotFound(ErrorBody),
    #[response(
        status = 503,
        description = "`served_elsewhere`: another relay instance holds the stand's pool; `store_unavailable`: the store of record cannot be read, or the stand could not be loaded from it; `busy`: the stand did not answer in time."
    )]
    Unavailable(ErrorBody),
}

/// Answers of an operation signed by a stand's pool, besides its success.
#[derive(Debug, utoipa::IntoResponses)]
pub enum OpAnswered {
    #[response(
        status = 202,
        description = "The stand's pool is a stand device that has not answered within 3 s: the request is queued (`request`, `status`), made once when the pool is connected; see GET /v1/stands/{stand}/requests."
    )]
    Queued {
        stand: String,
        request: i64,
        /// `queued`.
        status: String,
    },
    #[response(
        status = 400,
        description = "A malformed request: unknown fields, bad values, bad JSON."
    )]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "No valid admin token.")]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "The token's role is too weak.")]
    Forbidden(ErrorBody),
    #[response(
        status = 404,
        description = "The relay does not serve this stand, or the item or replica is unknown."
    )]
    NotFound(ErrorBody),
    #[response(
        status = 409,
        description = "`refused`: a stand device's pool refused the queued request; or the ledger refused the operation (`conflict`, with its reason)."
    )]
    Refused(ErrorBody),
    #[response(
        status = 503,
        description = "`served_elsewhere`: another relay instance holds the pool's lease; `store_unavailable`: nothing was written; `busy`: the stand did not answer in time."
    )]
    Unavailable(ErrorBody),
}
