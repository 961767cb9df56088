//! A stateful fake of the Kubernetes API for `coordination.k8s.io/v1` Leases, for tests (no API
//! server can run here). It stores Leases per namespace, enforces `resourceVersion` like the
//! real API server (a PUT with a stale version is a 409 Conflict, a PUT without one is refused,
//! a POST of an existing name is a 409 AlreadyExists), keeps one global, increasing version
//! counter, logs every request in a compact form for asserting exact request sequences, and can
//! fail (any HTTP status) or delay on demand.
//!
//! Use it in-process as the tower service behind a `kube::Client` ([`FakeApiServer::client`]),
//! or over HTTP ([`FakeApiServer::serve`]) for a node started with a kubeconfig pointing at it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, StatusCode, Uri};
use k8s_openapi::api::coordination::v1::Lease;

const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// A failure the fake injects into every request until cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status (and a Status body).
    Status(u16),
    /// Answer only after this long.
    Delay(Duration),
}

#[derive(Debug, Default)]
struct State {
    leases: BTreeMap<(String, String), Lease>,
    version: u64,
    log: Vec<String>,
    fault: Option<Fault>,
}

/// The fake API server; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Vec<u8>) {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, body.to_string().into_bytes())
}

fn version_of(l: &Lease) -> Option<&str> {
    l.metadata.resource_version.as_deref()
}

impl FakeApiServer {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Injects `fault` into every later request (`None` heals).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// The requests since the last call, e.g. `PUT /apis/…/leases/x rv=3 -> 409`.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    /// The stored Lease `name` in `namespace`.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Lease> {
        self.lock().leases.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every stored Lease, by (namespace, name).
    pub fn leases(&self) -> BTreeMap<(String, String), Lease> {
        self.lock().leases.clone()
    }

    /// Answers one request.
    pub async fn handle(&self, method: &Method, uri: &Uri, body: &[u8]) -> (StatusCode, Vec<u8>) {
        let path = uri.path();
        let fault = self.lock().fault;
        match fault {
            Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
            Some(Fault::Status(code)) => {
                let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                self.lock().log.push(format!("{method} {path} -> {}", code.as_u16()));
                return status(code, "InternalError", "injected failure");
            }
            None => {}
        }
        let mut state = self.lock();
        let (answer, note) = Self::apply(&mut state, method, path, body);
        let sent = if *method == Method::PUT {
            serde_json::from_slice::<Lease>(body)
                .ok()
                .and_then(|l| version_of(&l).map(|v| format!(" rv={v}")))
                .unwrap_or_else(|| " rv=none".into())
        } else {
            String::new()
        };
        state.log.push(format!("{method} {path}{sent} -> {}{note}", answer.0.as_u16()));
        answer
    }

    /// The API's effect on `state`; the note names the stored version after a success.
    fn apply(state: &mut State, method: &Method, path: &str, body: &[u8]) -> ((StatusCode, Vec<u8>), String) {
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return (status(StatusCode::NOT_FOUND, "NotFound", "the fake serves Leases only"), String::new());
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (namespace, name) = match parts.as_slice() {
            [ns, "leases"] => (ns.to_string(), None),
            [ns, "leases", name] => (ns.to_string(), Some(name.to_string())),
            _ => return (status(StatusCode::NOT_FOUND, "NotFound", "no such resource"), String::new()),
        };
        let stored = |l: &Lease| (StatusCode::OK, serde_json::to_vec(l).unwrap_or_default());
        let note = |l: &Lease| format!(" rv={}", version_of(l).unwrap_or("?"));
        match (method.clone(), name) {
            (Method::GET, Some(name)) => match state.leases.get(&(namespace, name.clone())) {
                Some(l) => (stored(l), note(l)),
                None => {
                    (status(StatusCode::NOT_FOUND, "NotFound", &format!("leases {name:?} not found")), String::new())
                }
            },
            (Method::POST, None) => {
                let Ok(mut lease) = serde_json::from_slice::<Lease>(body) else {
                    return (status(StatusCode::BAD_REQUEST, "BadRequest", "not a Lease"), String::new());
                };
                let Some(name) = lease.metadata.name.clone() else {
                    return (
                        status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required"),
                        String::new(),
                    );
                };
                let key = (namespace.clone(), name.clone());
                if state.leases.contains_key(&key) {
                    let msg = format!("leases {name:?} already exists");
                    return (status(StatusCode::CONFLICT, "AlreadyExists", &msg), String::new());
                }
                state.version += 1;
                lease.metadata.resource_version = Some(state.version.to_string());
                lease.metadata.namespace = Some(namespace);
                lease.metadata.uid = Some(format!("uid-{}", state.version));
                let n = note(&lease);
                let answer = (StatusCode::CREATED, serde_json::to_vec(&lease).unwrap_or_default());
                state.leases.insert(key, lease);
                (answer, n)
            }
            (Method::PUT, Some(name)) => {
                let Ok(mut lease) = serde_json::from_slice::<Lease>(body) else {
                    return (status(StatusCode::BAD_REQUEST, "BadRequest", "not a Lease"), String::new());
                };
                let key = (namespace.clone(), name.clone());
                let Some(current) = state.leases.get(&key) else {
                    let msg = format!("leases {name:?} not found");
                    return (status(StatusCode::NOT_FOUND, "NotFound", &msg), String::new());
                };
                match version_of(&lease) {
                    None => {
                        let msg = "metadata.resourceVersion: Invalid value: must be specified for an update";
                        return (status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", msg), String::new());
                    }
                    Some(v) if Some(v) != version_of(current) => {
                        let msg = format!(
                            "Operation cannot be fulfilled on leases.coordination.k8s.io {name:?}: the object has been \
                             modified; please apply your changes to the latest version and try again"
                        );
                        return (status(StatusCode::CONFLICT, "Conflict", &msg), String::new());
                    }
                    Some(_) => {}
                }
                state.version += 1;
                lease.metadata.resource_version = Some(state.version.to_string());
                lease.metadata.namespace = Some(namespace);
                lease.metadata.uid = current.metadata.uid.clone();
                let n = note(&lease);
                let answer = stored(&lease);
                state.leases.insert(key, lease);
                (answer, n)
            }
            _ => {
                (status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported by the fake"), String::new())
            }
        }
    }

    /// A `kube::Client` whose requests this fake answers in-process.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req: axum::http::Request<kube::client::Body>| {
            let fake = fake.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let (code, out) = fake.handle(&parts.method, &parts.uri, &bytes).await;
                let mut response = axum::http::Response::new(kube::client::Body::from(out));
                *response.status_mut() = code;
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        kube::Client::new(service, namespace)
    }

    /// Serves the fake over plain HTTP on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(
            |axum::extract::State(fake): axum::extract::State<FakeApiServer>,
             method: Method,
             uri: Uri,
             body: axum::body::Bytes| async move {
                let (code, out) = fake.handle(&method, &uri, &body).await;
                (code, [(axum::http::header::CONTENT_TYPE, "application/json")], out)
            },
        );
        axum::serve(listener, app.with_state(self)).with_graceful_shutdown(shutdown).await
    }
}
