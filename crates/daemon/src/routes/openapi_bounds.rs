//! The answers every operation can get from the API's bounds rather than from its handler,
//! added to the OpenAPI document: `503` when the listener already serves `--api-max-connections`
//! connections, and, for operations with a request body, `408` (the body did not arrive within
//! `--body-timeout-ms` of its head) and `413` (over `--max-body`). All three have the error shape
//! and close the connection.

use utoipa::openapi::path::Operation;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::Modify;

pub struct BoundsResponses;

const UNAVAILABLE: &str = "this listener already serves --api-max-connections connections: \
    answered at once and closed, never queued (retry later)";
const TIMEOUT: &str = "the request body did not arrive in full within --body-timeout-ms of its head; \
    the connection is closed";
const TOO_LARGE: &str = "the request body is over --max-body bytes; the connection is closed";

impl Modify for BoundsResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                add(op);
            }
        }
    }
}

fn add(op: &mut Operation) {
    let has_body = op.request_body.is_some();
    let responses = &mut op.responses.responses;
    match responses.get_mut("503") {
        // A handler's own 503 (the host lacks memory): the connection limit is the other reason.
        Some(RefOr::T(r)) => {
            let own = if r.description.is_empty() { "the host lacks the memory asked for" } else { &r.description };
            r.description = format!("{own}; or {UNAVAILABLE}");
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            responses.insert("503".into(), error(UNAVAILABLE));
        }
    }
    if has_body {
        for (code, text) in [("408", TIMEOUT), ("413", TOO_LARGE)] {
            match responses.get_mut(code) {
                Some(RefOr::T(r)) if r.description.is_empty() => r.description = text.into(),
                Some(_) => {}
                None => {
                    responses.insert(code.into(), error(text));
                }
            }
        }
    }
}

fn error(description: &str) -> RefOr<utoipa::openapi::Response> {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    RefOr::T(ResponseBuilder::new().description(description).content("application/json", body).build())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use utoipa::OpenApi;

    #[test]
    fn every_operation_documents_the_bounds_answers() {
        let doc: serde_json::Value = serde_json::from_str(&super::super::ApiDoc::openapi().to_json().unwrap()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let r = &op["responses"];
                assert!(r["503"].is_object(), "{method} {path}: no 503");
                let d = r["503"]["description"].as_str().unwrap();
                assert!(d.contains("--api-max-connections"), "{method} {path}: 503 says {d:?}");
                let body = !op["requestBody"].is_null();
                for code in ["408", "413"] {
                    assert_eq!(r[code].is_object(), body, "{method} {path}: {code} documented iff it has a body");
                }
                seen += 1;
            }
        }
        assert!(seen > 20, "{seen} operations");
        let create = &doc["paths"]["/v1/sandboxes"]["post"]["responses"];
        assert!(create["503"]["description"].as_str().unwrap().starts_with("the host lacks the memory"), "{create}");
        assert_eq!(create["413"]["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody");
    }
}
