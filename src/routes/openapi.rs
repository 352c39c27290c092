//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "endpoint-stats", description = "Counts accesses to its API endpoints"),
    paths(
        super::counting::root,
        super::counting::stats,
        super::counting::endpoints,
        super::probes::health,
        super::probes::ready,
        super::metrics::render,
        document
    ),
    tags((name = "counting", description = "Counted API endpoints"), (name = "probes", description = "Not counted"))
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", tag = "probes", responses((status = 200, description = "This document")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
