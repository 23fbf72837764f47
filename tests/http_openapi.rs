//! `GET /openapi.json` stays true to the API it describes: every route the
//! router serves is documented with its methods and security, every
//! documented operation is served, real answers validate against the
//! documented schemas (which refuse undocumented properties, so a field the
//! core adds or drops fails here), and the request schemas match what the
//! front and the core accept.

mod support;

use support::front::{Front, ADMIN_KEY, WAIT};

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Every route the router serves but the console's static assets
/// (`/console/*.js|css|svg`), which are files, not API. Adding a route to
/// `src/http/mod.rs` means adding it here and documenting it.
const ROUTES: &[(&str, &str, bool)] = &[
    // (method, path, needs a key)
    ("get", "/v1/conversations", true),
    ("get", "/v1/conversations/{id}", true),
    ("post", "/v1/conversations/{id}/messages", true),
    ("get", "/v1/conversations/{id}/events", true),
    ("get", "/v1/usage", true),
    ("post", "/v1/chat/completions", true),
    ("get", "/v1/models", true),
    ("get", "/v1/models/{model}", true),
    ("post", "/admin/keys", true),
    ("get", "/admin/keys", true),
    ("delete", "/admin/keys/{id}", true),
    ("patch", "/admin/keys/{id}", true),
    ("get", "/admin/costs", true),
    ("get", "/admin/audit", true),
    ("delete", "/admin/conversations/{id}", true),
    ("get", "/healthz", false),
    ("get", "/readyz", false),
    ("get", "/metrics", false),
    ("get", "/openapi.json", false),
    ("get", "/", false),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// An answer: status, headers, and the body as JSON (null when it is not).
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Front {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.request(method, path, key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        answer(request).await
    }

    async fn document(&self) -> Value {
        let doc = self.call(Method::GET, "/openapi.json", None, None).await;
        assert_eq!(doc.status, StatusCode::OK);
        doc.body
    }

    async fn history_of(&self, key: &str, id: &str, n: usize) -> Answer {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let path = format!("/v1/conversations/{id}");
            let history = self.call(Method::GET, &path, Some(key), None).await;
            assert_eq!(history.status, StatusCode::OK, "{}", history.body);
            if history.body["messages"].as_array().map_or(0, Vec::len) == n {
                return history;
            }
            assert!(tokio::time::Instant::now() < deadline, "{}", history.body);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the request is answered");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("a body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// Reads an SSE body into `(event name, data)` pairs until it ends.
async fn sse(response: reqwest::Response) -> Vec<(String, String)> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream moves on")
    {
        buffer.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut kind, mut data) = (String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((kind, data));
            }
        }
    }
    events
}

// ---- Reading the document --------------------------------------------------

/// `#/components/…` and the like.
fn resolve<'d>(doc: &'d Value, mut value: &'d Value) -> &'d Value {
    while let Some(reference) = value["$ref"].as_str() {
        let pointer = reference.strip_prefix('#').expect("a local $ref");
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{reference} resolves"));
    }
    value
}

/// The documented operation.
fn operation<'d>(doc: &'d Value, method: &str, path: &str) -> &'d Value {
    let operation = &doc["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is documented");
    operation
}

/// The documented response for a status.
fn response<'d>(doc: &'d Value, method: &str, path: &str, status: StatusCode) -> &'d Value {
    let responses = &operation(doc, method, path)["responses"];
    let response = &responses[status.as_str()];
    assert!(
        response.is_object(),
        "{method} {path} documents {status}; it documents {:?}",
        responses.as_object().map(|r| r.keys().collect::<Vec<_>>())
    );
    resolve(doc, response)
}

/// The schema of a documented response's `content_type` body.
fn body_schema<'d>(
    doc: &'d Value,
    method: &str,
    path: &str,
    status: StatusCode,
    content_type: &str,
) -> &'d Value {
    let schema = &response(doc, method, path, status)["content"][content_type]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status} documents {content_type}"
    );
    schema
}

/// Checks a real answer: its status is documented, its JSON body matches
/// the schema, and the documented headers are there.
#[track_caller]
fn check(doc: &Value, method: &str, path: &str, answer: &Answer) {
    let schema = body_schema(doc, method, path, answer.status, "application/json");
    let errors = validate(doc, schema, &answer.body, "$");
    assert!(
        errors.is_empty(),
        "{method} {path} {}: {errors:#?}\n{}",
        answer.status,
        answer.body
    );
    let documented = response(doc, method, path, answer.status)["headers"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let documented: BTreeSet<String> = documented.keys().map(|h| h.to_ascii_lowercase()).collect();
    // Conditional ones: the rate-limit figures of the limits the key has,
    // `Retry-After` on a refusal.
    let conditional = |name: &str| {
        name.starts_with("ratelimit-") || name.starts_with("x-ratelimit-") || name == "retry-after"
    };
    for name in &documented {
        assert!(
            conditional(name) || answer.headers.contains_key(name.as_str()),
            "{method} {path} {}: documented header {name} is missing",
            answer.status
        );
    }
    for name in answer.headers.keys() {
        let name = name.as_str();
        assert!(
            !(conditional(name) || name == "x-conversation-id") || documented.contains(name),
            "{method} {path} {}: header {name} is not documented",
            answer.status
        );
    }
}

/// Validates `value` against a (JSON Schema 2020-12 subset) schema: `$ref`,
/// `type` (one or several), `enum`, `properties`/`required`, `items`,
/// `oneOf`/`anyOf`/`allOf`. An object schema with `properties` refuses any
/// other property unless `additionalProperties` allows it: that is what
/// catches drift.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut errors = Vec::new();
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            if !options
                .iter()
                .any(|option| validate(doc, option, value, at).is_empty())
            {
                errors.push(format!("{at}: matches none of {key} {options:?}"));
            }
        }
    }
    if let Some(types) = types_of(schema) {
        let matches = types.iter().any(|t| match t.as_str() {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !matches {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
            return errors;
        }
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            errors.push(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, item) in values.iter().enumerate() {
            errors.extend(validate(doc, items, item, &format!("{at}[{i}]")));
        }
    }
    if let Some(object) = value.as_object() {
        let (properties, required, closed) = object_parts(doc, schema);
        for name in &required {
            if !object.contains_key(name) {
                errors.push(format!("{at}: required property {name} is missing"));
            }
        }
        for (name, field) in object {
            match properties.get(name) {
                Some(property) => {
                    errors.extend(validate(doc, property, field, &format!("{at}.{name}")))
                }
                None if closed => errors.push(format!("{at}: property {name} is not documented")),
                None => {}
            }
        }
    }
    errors
}

fn types_of(schema: &Value) -> Option<Vec<String>> {
    match &schema["type"] {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(types) => Some(
            types
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

/// An object schema's properties and required ones, `allOf` merged, and
/// whether it is closed (documents properties, allows no others).
fn object_parts(doc: &Value, schema: &Value) -> (BTreeMap<String, Value>, BTreeSet<String>, bool) {
    let schema = resolve(doc, schema);
    let mut properties: BTreeMap<String, Value> = schema["properties"]
        .as_object()
        .map(|p| p.clone().into_iter().collect())
        .unwrap_or_default();
    let mut required: BTreeSet<String> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let mut open = matches!(
        &schema["additionalProperties"],
        Value::Bool(true) | Value::Object(_)
    );
    for part in schema["allOf"].as_array().into_iter().flatten() {
        let (p, r, closed) = object_parts(doc, part);
        properties.extend(p);
        required.extend(r);
        open |= !closed && !resolve(doc, part)["properties"].is_object();
    }
    let closed = !properties.is_empty() && !open;
    (properties, required, closed)
}

/// The documented (method, path) pairs.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut pairs = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(*method).is_some() {
                pairs.insert(((*method).to_owned(), path.clone()));
            }
        }
    }
    pairs
}

/// A documented path with sample values for its parameters.
fn sample(path: &str) -> String {
    path.replace("{id}", "probe-1").replace("{model}", "echo")
}

// ---- Tests -----------------------------------------------------------------

#[tokio::test]
async fn every_route_is_documented_and_every_documented_route_is_served() {
    let front = Front::start().await;
    let doc = front.document().await;
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"],
        json!({ "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"] })
    );

    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path, _)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(documented(&doc), expected, "documented vs served routes");

    for (method, path, keyed) in ROUTES {
        let operation = operation(&doc, method, path);
        let secured = operation["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        assert_eq!(secured, *keyed, "{method} {path}: documented security");
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path} documents responses"
        );
        // Every path parameter is documented.
        for name in path.split('{').skip(1).filter_map(|p| p.split('}').next()) {
            assert!(
                operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == json!(name) && p["in"] == json!("path")),
                "{method} {path}: path parameter {name} is documented"
            );
        }

        // Served: without a key, a keyed route is refused with the documented
        // 401, and nothing answers the router's 404 or 405.
        let http_method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let body = matches!(*method, "post" | "patch").then(|| match *path {
            "/v1/chat/completions" => {
                json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] })
            }
            "/admin/keys" => json!({ "name": "probe" }),
            "/admin/keys/{id}" => json!({ "limits": { "rpm": 5 } }),
            _ => json!({ "content": "hi" }),
        });
        let answer = front.call(http_method, &sample(path), None, body).await;
        assert_ne!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_ne!(
            answer.body["error"]["message"],
            json!("no such route"),
            "{method} {path} is served"
        );
        if *keyed {
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            check(&doc, method, path, &answer);
        } else {
            assert_eq!(answer.status, StatusCode::OK, "{method} {path}");
            let content_type = answer.headers["content-type"].to_str().expect("ascii");
            let documented = response(&doc, method, path, StatusCode::OK)["content"]
                .as_object()
                .expect("content");
            assert!(
                documented
                    .keys()
                    .any(|c| content_type.starts_with(c.split(';').next().unwrap_or(c))),
                "{method} {path}: {content_type} is documented in {:?}",
                documented.keys()
            );
        }
    }
    front.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_documented_schemas() {
    let front = Front::start().await;
    let doc = front.document().await;

    // Keys.
    let issued = front
        .call(
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!({ "name": "ana", "owner": "ana@example.com", "limits": { "rpm": 50, "tpm": 100000 } })),
        )
        .await;
    assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
    check(&doc, "post", "/admin/keys", &issued);
    let key = issued.body["key"].as_str().expect("key").to_owned();
    let key_id = issued.body["key_id"].as_str().expect("key_id").to_owned();
    let keys = front
        .call(Method::GET, "/admin/keys", Some(ADMIN_KEY), None)
        .await;
    check(&doc, "get", "/admin/keys", &keys);
    let denied = front
        .call(Method::GET, "/admin/keys", Some(&key), None)
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    check(&doc, "get", "/admin/keys", &denied);

    // A send, its duplicate, the history, the list, the usage.
    let send = "/v1/conversations/{id}/messages";
    let message = json!({ "content": "hello", "message_id": "m1", "agent": "echo", "user": "ana" });
    let ack = front
        .call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(message.clone()),
        )
        .await;
    assert_eq!(ack.status, StatusCode::ACCEPTED, "{}", ack.body);
    check(&doc, "post", send, &ack);
    let again = front
        .call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(message),
        )
        .await;
    assert_eq!(again.body["duplicate"], json!(true));
    check(&doc, "post", send, &again);
    let history = front.history_of(&key, "c1", 2).await;
    check(&doc, "get", "/v1/conversations/{id}", &history);
    let listed = front
        .call(Method::GET, "/v1/conversations?limit=10", Some(&key), None)
        .await;
    assert_eq!(
        listed.body["conversations"][0]["conversation_id"],
        json!("c1")
    );
    check(&doc, "get", "/v1/conversations", &listed);
    let usage = front.call(Method::GET, "/v1/usage", Some(&key), None).await;
    check(&doc, "get", "/v1/usage", &usage);

    // Errors in the front's shape.
    let bad_id = front
        .call(Method::GET, "/v1/conversations/c@1", Some(&key), None)
        .await;
    assert_eq!(bad_id.status, StatusCode::UNPROCESSABLE_ENTITY);
    check(&doc, "get", "/v1/conversations/{id}", &bad_id);
    let bad_query = front
        .call(Method::GET, "/v1/conversations?planet=1", Some(&key), None)
        .await;
    assert_eq!(
        bad_query.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        bad_query.body
    );
    check(&doc, "get", "/v1/conversations", &bad_query);
    let unknown_field = front
        .call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(json!({ "content": "x", "planet": 1 })),
        )
        .await;
    assert_eq!(unknown_field.status, StatusCode::UNPROCESSABLE_ENTITY);
    check(&doc, "post", send, &unknown_field);
    let not_json = answer(
        front
            .request(Method::POST, "/v1/conversations/c1/messages", Some(&key))
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    check(&doc, "post", send, &not_json);
    let no_type = answer(
        front
            .request(Method::POST, "/v1/conversations/c1/messages", Some(&key))
            .body("{}"),
    )
    .await;
    assert_eq!(no_type.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    check(&doc, "post", send, &no_type);
    let too_large = front
        .call(
            Method::POST,
            "/v1/conversations/c1/messages",
            Some(&key),
            Some(json!({ "content": "x".repeat(300_000) })),
        )
        .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    check(&doc, "post", send, &too_large);

    // A streamed send: the ack, the deltas, the stored end.
    let streamed = front
        .request(Method::POST, "/v1/conversations/c1/messages", Some(&key))
        .header("Accept", "text/event-stream")
        .json(&json!({ "content": "one two" }))
        .send()
        .await
        .expect("answered");
    assert_eq!(streamed.status(), StatusCode::OK);
    body_schema(&doc, "post", send, StatusCode::OK, "text/event-stream");
    let events = sse(streamed).await;
    for (kind, data) in &events {
        let name = match kind.as_str() {
            "ack" => "Ack",
            "reply_delta" => "ReplyDelta",
            _ => "Envelope",
        };
        let schema = json!({ "$ref": format!("#/components/schemas/{name}") });
        let value = serde_json::from_str(data).expect("JSON");
        let errors = validate(&doc, &schema, &value, "$");
        assert!(errors.is_empty(), "{kind}: {errors:?}\n{data}");
    }
    assert_eq!(
        events.last().map(|(k, _)| k.as_str()),
        Some("reply_completed")
    );
    front.history_of(&key, "c1", 4).await;

    // Reports and administration.
    let costs = front
        .call(Method::GET, "/admin/costs?by=model", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(
        costs.body["rows"][0]["group"],
        json!("echo"),
        "{}",
        costs.body
    );
    check(&doc, "get", "/admin/costs", &costs);
    let audit = front
        .call(Method::GET, "/admin/audit?limit=50", Some(ADMIN_KEY), None)
        .await;
    assert!(!audit.body["events"].as_array().expect("events").is_empty());
    check(&doc, "get", "/admin/audit", &audit);
    let erased = front
        .call(
            Method::DELETE,
            "/admin/conversations/c1",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    check(&doc, "delete", "/admin/conversations/{id}", &erased);
    let missing = front
        .call(
            Method::DELETE,
            "/admin/conversations/nope",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    check(&doc, "delete", "/admin/conversations/{id}", &missing);
    let changed = front
        .call(
            Method::PATCH,
            &format!("/admin/keys/{key_id}"),
            Some(ADMIN_KEY),
            Some(json!({ "budget": { "micros": 5_000_000, "period": "month" } })),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.body);
    assert_eq!(changed.body["key"]["budget"]["micros"], json!(5_000_000));
    check(&doc, "patch", "/admin/keys/{id}", &changed);
    let revoked = front
        .call(
            Method::DELETE,
            &format!("/admin/keys/{key_id}?reason=rotated"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    check(&doc, "delete", "/admin/keys/{id}", &revoked);
    let unchangeable = front
        .call(
            Method::PATCH,
            &format!("/admin/keys/{key_id}"),
            Some(ADMIN_KEY),
            Some(json!({ "limits": { "rpm": 1 } })),
        )
        .await;
    assert_eq!(
        unchangeable.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        unchangeable.body
    );
    check(&doc, "patch", "/admin/keys/{id}", &unchangeable);

    // Ops.
    for path in ["/healthz", "/readyz"] {
        let answer = front.call(Method::GET, path, None, None).await;
        check(&doc, "get", path, &answer);
    }
    front.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_answers_match_the_documented_schemas() {
    let front = Front::start().await;
    let doc = front.document().await;
    let path = "/v1/chat/completions";
    let issued = front
        .call(
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!({ "name": "bo", "limits": { "rpm": 50 } })),
        )
        .await;
    let key = issued.body["key"].as_str().expect("key").to_owned();

    let models = front
        .call(Method::GET, "/v1/models", Some(&key), None)
        .await;
    check(&doc, "get", "/v1/models", &models);
    let model = front
        .call(Method::GET, "/v1/models/echo", Some(&key), None)
        .await;
    check(&doc, "get", "/v1/models/{model}", &model);
    let unknown = front
        .call(Method::GET, "/v1/models/nope", Some(&key), None)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    check(&doc, "get", "/v1/models/{model}", &unknown);

    let body = json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] });
    let completion = front
        .call(Method::POST, path, Some(&key), Some(body.clone()))
        .await;
    assert_eq!(completion.status, StatusCode::OK, "{}", completion.body);
    check(&doc, "post", path, &completion);
    let bad = front
        .call(
            Method::POST,
            path,
            Some(&key),
            Some(json!({ "model": "echo", "messages": [] })),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    check(&doc, "post", path, &bad);

    let mut streaming = body;
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({ "include_usage": true });
    let response = front
        .request(Method::POST, path, Some(&key))
        .json(&streaming)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-conversation-id"));
    body_schema(&doc, "post", path, StatusCode::OK, "text/event-stream");
    let chunk = json!({ "$ref": "#/components/schemas/ChatCompletionChunk" });
    let mut lines = sse(response).await;
    assert_eq!(lines.pop().map(|(_, d)| d).as_deref(), Some("[DONE]"));
    assert!(lines.len() >= 3, "{lines:?}");
    for (_, data) in &lines {
        let errors = validate(
            &doc,
            &chunk,
            &serde_json::from_str(data).expect("JSON"),
            "$",
        );
        assert!(errors.is_empty(), "{errors:?}\n{data}");
    }
    front.server.shutdown().await;
}

#[tokio::test]
async fn request_schemas_match_what_is_accepted() {
    let front = Front::start().await;
    let doc = front.document().await;
    let schemas = &doc["components"]["schemas"];

    // SendBody: every documented property is accepted, nothing else is.
    let (properties, required, _) = object_parts(&doc, &schemas["SendBody"]);
    assert_eq!(required, BTreeSet::from(["content".to_owned()]));
    let issued = front
        .call(
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!({ "name": "cy" })),
        )
        .await;
    let key = issued.body["key"].as_str().expect("key").to_owned();
    let full: serde_json::Map<String, Value> = properties
        .keys()
        .map(|name| {
            (
                name.clone(),
                json!(if name == "agent" { "echo" } else { "x1" }),
            )
        })
        .collect();
    let sent = front
        .call(
            Method::POST,
            "/v1/conversations/r1/messages",
            Some(&key),
            Some(Value::Object(full)),
        )
        .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.body);

    // KeySpec: the core's own list of fields (it refuses unknown ones).
    let refused = front
        .call(
            Method::POST,
            "/admin/keys",
            Some(ADMIN_KEY),
            Some(json!({ "name": "x", "planet": 1 })),
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.body
    );
    let message = refused.body["error"]["message"].as_str().expect("message");
    let expected = message
        .split("expected one of")
        .nth(1)
        .expect("the fields are listed");
    let accepted: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    let (properties, required, _) = object_parts(&doc, &schemas["KeySpec"]);
    assert_eq!(
        properties.keys().cloned().collect::<BTreeSet<_>>(),
        accepted,
        "{message}"
    );
    assert_eq!(required, BTreeSet::from(["name".to_owned()]));

    // ChatCompletionRequest: each required property missing is a 400 naming it.
    let (_, required, _) = object_parts(&doc, &schemas["ChatCompletionRequest"]);
    assert_eq!(
        required,
        BTreeSet::from(["messages".to_owned(), "model".to_owned()])
    );
    for name in &required {
        let mut body =
            json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] });
        body.as_object_mut().expect("object").remove(name);
        let refused = front
            .call(Method::POST, "/v1/chat/completions", Some(&key), Some(body))
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(refused.body["error"]["param"], json!(name));
    }

    // Query parameters: every documented one is accepted.
    for (path, sample_value) in [
        ("/v1/conversations", None),
        ("/admin/costs", Some(("by", "day"))),
        ("/admin/audit", None),
        ("/admin/keys/{id}", None),
    ] {
        let method = if path == "/admin/keys/{id}" {
            "delete"
        } else {
            "get"
        };
        let parameters = operation(&doc, method, path)["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let query: Vec<String> = parameters
            .iter()
            .filter(|p| p["in"] == json!("query"))
            .map(|p| {
                let name = p["name"].as_str().expect("name");
                let value = match (sample_value, name, p["schema"]["format"].as_str()) {
                    (Some((n, v)), _, _) if n == name => v.to_owned(),
                    (_, "cursor", _) => "1".to_owned(),
                    (_, _, Some("date")) => "2026-01-01".to_owned(),
                    (_, _, Some("date-time")) => "2026-01-01T00:00:00Z".to_owned(),
                    (_, "limit", _) => "5".to_owned(),
                    _ => "x".to_owned(),
                };
                format!("{name}={value}")
            })
            .collect();
        assert!(!query.is_empty(), "{path} documents query parameters");
        let target = format!("{}?{}", path.replace("{id}", "key_nope"), query.join("&"));
        let answer = front
            .call(
                Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"),
                &target,
                Some(ADMIN_KEY),
                None,
            )
            .await;
        let message = answer.body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("unknown field"),
            "{target}: a documented parameter is refused: {message}"
        );
    }
    front.server.shutdown().await;
}
