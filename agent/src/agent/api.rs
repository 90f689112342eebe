//! The REST API: routes, handlers, authentication, and the OpenAPI
//! document generated from them (utoipa).

use super::error::ApiError;
use super::model::{
    CloneReq, CreateVm, Created, ErrorBody, Event, HostView, SnapshotReq, SnapshotTaken, VmList,
    VmView,
};
use super::tokens::{Caller, Role, Tokens};
use super::vms::{CONSOLE_KEEP, Vms};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use std::sync::Arc;
use utoipa::OpenApi;

/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;

pub struct App {
    pub vms: Arc<Vms>,
    pub tokens: Tokens,
}

type Shared = State<Arc<App>>;

/// The agent's routes.
pub fn router(app: Arc<App>) -> Router {
    let authed = Router::new()
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/vms/{id}/start", post(start_vm))
        .route("/vms/{id}/pause", post(pause_vm))
        .route("/vms/{id}/resume", post(resume_vm))
        .route("/vms/{id}/stop", post(stop_vm))
        .route("/vms/{id}/snapshot", post(snapshot_vm))
        .route("/vms/{id}/clone", post(clone_vm))
        .route("/vms/{id}/console", get(console))
        .route("/events", get(events))
        .route("/host", get(host))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed(method: Method) -> Response {
    let body = ErrorBody {
        code: "method-not-allowed".into(),
        message: format!("{method} is not allowed here"),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// Finds the caller from its bearer token; a reader may only read.
async fn authenticate(State(app): Shared, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(caller) = app.tokens.check(header).cloned() else {
        let mut resp = ApiError::Unauthorized.into_response();
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    };
    if caller.role == Role::Reader && req.method() != Method::GET {
        return ApiError::Forbidden(format!(
            "a reader (tenant {:?}) cannot change anything",
            caller.tenant
        ))
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A JSON body (an empty one is the type's default) whose errors are API
/// errors.
pub struct Body<T>(pub T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!("a request body is at most {MAX_BODY} bytes"))
            } else {
                ApiError::BadRequest(e.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid: {e}")))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vmplant agent",
        description = "The VM host agent's API: VMs (one VMM process each), their lifecycle, consoles and events, and the host. Every call but this document's needs `Authorization: Bearer TOKEN`.",
    ),
    paths(
        list_vms, create_vm, get_vm, delete_vm, start_vm, pause_vm, resume_vm, stop_vm,
        snapshot_vm, clone_vm, console, events, host, openapi_json
    ),
    components(schemas(ErrorBody, Event)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document, as served and as checked in (docs/openapi.json).
pub fn openapi_document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// This API's OpenAPI 3 document.
#[utoipa::path(get, path = "/openapi.json", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

/// The VMs the caller can see (a tenant's own; an admin's all).
#[utoipa::path(get, path = "/vms", responses(
    (status = 200, description = "OK", body = VmList),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody)))]
async fn list_vms(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<Json<VmList>, ApiError> {
    let vms = app.vms.list(&caller)?.iter().map(|r| r.view()).collect();
    Ok(Json(VmList { vms }))
}

/// Creates a VM (from a kernel, or restored from a snapshot) and starts
/// it unless `"start": false`.
#[utoipa::path(post, path = "/vms", request_body = CreateVm, responses(
    (status = 201, description = "Created", body = Created),
    (status = 400, description = "Bad request", body = ErrorBody),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody),
    (status = 403, description = "A reader, or over the tenant's quota (the message names the limit)", body = ErrorBody),
    (status = 404, description = "No such snapshot for this tenant", body = ErrorBody),
    (status = 413, description = "The body is too large", body = ErrorBody),
    (status = 500, description = "The VMM did not start", body = ErrorBody)))]
async fn create_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Body(req): Body<CreateVm>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let created = app.vms.create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// One VM: state, configuration, pid, uptime.
#[utoipa::path(get, path = "/vms/{id}", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", body = VmView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody)))]
async fn get_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.vms.visible(&caller, &id)?.view()))
}

/// Ends the VM's process if it has one and forgets the VM (its console
/// log too; its snapshots stay).
#[utoipa::path(delete, path = "/vms/{id}", params(("id" = String, Path)), responses(
    (status = 204, description = "Deleted"),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody),
    (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody)))]
async fn delete_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.vms.destroy(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a created, stopped or crashed VM.
#[utoipa::path(post, path = "/vms/{id}/start", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", body = VmView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn start_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.vms.start(&caller, &id).await?.view()))
}

/// Pauses a running VM's vCPUs.
#[utoipa::path(post, path = "/vms/{id}/pause", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", body = VmView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn pause_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.vms.pause(&caller, &id, true).await?.view()))
}

/// Lets a paused VM run again.
#[utoipa::path(post, path = "/vms/{id}/resume", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", body = VmView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn resume_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.vms.pause(&caller, &id, false).await?.view()))
}

/// Ends the VM's process (it is killed if it does not end within 10 s);
/// the VM stays, stopped.
#[utoipa::path(post, path = "/vms/{id}/stop", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", body = VmView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn stop_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    Ok(Json(app.vms.stop(&caller, &id).await?.view()))
}

/// Saves the running (or paused) VM into a snapshot directory; it goes
/// on as it was.
#[utoipa::path(post, path = "/vms/{id}/snapshot", params(("id" = String, Path)), request_body = SnapshotReq, responses(
    (status = 200, description = "OK", body = SnapshotTaken),
    (status = 400, description = "Bad request", body = ErrorBody),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn snapshot_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<SnapshotReq>,
) -> Result<Json<SnapshotTaken>, ApiError> {
    Ok(Json(app.vms.snapshot(&caller, &id, req.dir).await?))
}

/// Creates a new VM restored from one of this VM's snapshots (its
/// latest by default), and starts it unless `"start": false`.
#[utoipa::path(post, path = "/vms/{id}/clone", params(("id" = String, Path)), request_body = CloneReq, responses(
    (status = 201, description = "Created", body = Created),
    (status = 400, description = "Bad request", body = ErrorBody),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody), (status = 403, description = "Forbidden: a reader, a tenant's limit, or an admin-only option", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody), (status = 409, description = "The VM's state does not allow it", body = ErrorBody),
    (status = 500, description = "The VMM failed", body = ErrorBody)))]
async fn clone_vm(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<CloneReq>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let created = app.vms.clone_vm(&caller, &id, req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// What the guest wrote on its serial console: the last MiB at most.
#[utoipa::path(get, path = "/vms/{id}/console", params(("id" = String, Path)), responses(
    (status = 200, description = "OK", content_type = "text/plain", body = String),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody),
    (status = 404, description = "No such VM (or not the caller's)", body = ErrorBody)))]
async fn console(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rec = app.vms.visible(&caller, &id)?;
    let path = rec.console.clone();
    let bytes = tokio::task::spawn_blocking(move || super::process::read_tail(&path, CONSOLE_KEEP))
        .await
        .map_err(|e| ApiError::Failed(e.to_string()))?
        .map_err(|e| ApiError::Failed(format!("cannot read the console of VM {id}: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

/// Lifecycle events of the caller's VMs as they happen, one JSON object
/// per line: created, started, paused, resumed, stopped (with a reason:
/// shutdown, crashed or destroyed), deleted.
#[utoipa::path(get, path = "/events", responses(
    (status = 200, description = "OK", content_type = "application/x-ndjson", body = Event),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody)))]
async fn events(State(app): Shared, Extension(caller): Extension<Caller>) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let rx = app.vms.events.subscribe();
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let caller = caller.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(e) if caller.sees(&e.tenant) => {
                        let mut line = serde_json::to_vec(&e).unwrap_or_default();
                        line.push(b'\n');
                        return Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), rx));
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// The host: vCPUs, memory, and the caller's VMs.
#[utoipa::path(get, path = "/host", responses(
    (status = 200, description = "OK", body = HostView),
    (status = 401, description = "No or a bad bearer token", body = ErrorBody)))]
async fn host(
    State(app): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<Json<HostView>, ApiError> {
    let vms = app.vms.list(&caller)?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            >> 10
    };
    Ok(Json(HostView {
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        mem_total_mib: field("MemTotal:"),
        mem_free_mib: field("MemAvailable:"),
        vms: vms.len() as u32,
        vms_running: vms.iter().filter(|v| v.state.has_process()).count() as u32,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/openapi.json is the document the code generates; run with
    /// `UPDATE_OPENAPI=1` to write it anew after an API change.
    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = openapi_document();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "docs/openapi.json differs from the API the code serves: \
             run `UPDATE_OPENAPI=1 cargo test -p agent openapi` and commit it"
        );
    }
}
