//! The daemon against a real HTTP client: auth, bad input, every sandbox endpoint, privacy,
//! transparent wake (exactly once under concurrency), templates, events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::{forkvm, Daemon};
use serde_json::{json, Value};

#[test]
fn auth_bad_input_and_single_instance() {
    let d = Daemon::start("bad");
    let t = d.token("ws1");
    // Tokens: missing, malformed, unknown.
    assert_eq!(d.raw("GET", "/v1/sandboxes", None, None).status, 401);
    assert_eq!(d.raw("GET", "/v1/sandboxes", Some("fkv_nope"), None).status, 401);
    assert_eq!(d.expect(200, "GET", "/v1/sandboxes", &t, None)["sandboxes"], json!([]));
    // Bodies: malformed JSON, unknown fields, wrong types, too large.
    let post = |body: &str| d.raw("POST", "/v1/sandboxes", Some(&t), Some(body.to_string()));
    for (body, status) in [
        ("{", 400),
        ("not json", 400),
        (r#"{"nmae":"x"}"#, 400),
        (r#"{"memory_mib":"lots"}"#, 400),
        (r#"{"privacy":"secret"}"#, 400),
        (r#"{"policy":{"pause_after":-1}}"#, 400),
        (r#"{"memory_mib":3}"#, 400),
        (r#"{"template":"tpl-missing"}"#, 404),
        (r#"{"memory_mib":16777216}"#, 400),
    ] {
        let a = post(body);
        assert_eq!(a.status, status, "{body}: {}", a.body);
    }
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(1 << 20));
    assert_eq!(post(&big).status, 413);
    // A 413 leaves the rest of the body unread, so the daemon closes that connection and says so:
    // a client must not reuse it (reqwest did, and the next request failed with IncompleteMessage).
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/sandboxes", d.base))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(r.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));
    // Queries and paths.
    assert_eq!(d.req("GET", "/v1/sandboxes?limit=0", &t, None).status, 400);
    assert_eq!(d.req("GET", "/v1/sandboxes?state=dancing", &t, None).status, 400);
    assert_eq!(d.req("GET", "/v1/sandboxes?bogus=1", &t, None).status, 400);
    assert_eq!(d.req("GET", "/v1/sandboxes/sb-nope", &t, None).status, 404);
    assert_eq!(d.req("POST", "/v1/sandboxes/sb-nope/exec", &t, Some(json!({"line": "ping"}))).status, 404);
    assert_eq!(d.req("GET", "/v1/nowhere", &t, None).status, 404);
    assert_eq!(d.req("PUT", "/v1/sandboxes", &t, None).status, 405);
    // The socket is private; a second daemon on the run dir refuses to start.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.run.join("forkvmd.sock")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = forkvm(&d.run).arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another forkvm daemon is running"), "{out:?}");
    // The OpenAPI document served is the committed one.
    let served = d.raw("GET", "/v1/openapi.json", None, None).body;
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed, "docs/openapi.json is stale: forkvm serve --openapi > docs/openapi.json");
    // The CLI speaks the Unix socket.
    let out = forkvm(&d.run).args(["sandbox", "ls"]).env("FORKVM_TOKEN", &t).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ID"), "{out:?}");
    let out = forkvm(&d.run).args(["sandbox", "ls"]).env("FORKVM_TOKEN", "fkv_bad").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown token"), "{out:?}");
    assert!(out.stdout.is_empty(), "no table header before a failed list: {out:?}");
    // No token at all: said so, with how to get one.
    let out = forkvm(&d.run).args(["sandbox", "ls"]).env_remove("FORKVM_TOKEN").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("FORKVM_TOKEN is not set") && err.contains("forkvm token create"),
        "{err}"
    );
    // /metrics is OpenMetrics text (counters are `x_total` under `# TYPE x counter`, `# EOF` at the
    // end) and says so, so Prometheus parses it as such rather than as its 0.0.4 text format.
    let r = reqwest::blocking::get(format!("{}/metrics", d.base)).unwrap();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    let body = r.text().unwrap();
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(ct, "application/openmetrics-text; version=1.0.0; charset=utf-8");
}

#[test]
fn sandbox_lifecycle_wake_fork_template() {
    let d = Daemon::start("life");
    let t = d.token("ws1");
    let id = d.create(&t, json!({"name": "first"}));
    let a = d.exec(&t, &id, "ping");
    assert_eq!((a.body["lines"][0].as_str(), a.came_up.as_deref()), (Some("pong"), Some("running")));
    assert_eq!(d.line(&t, &id, "count"), "count 1");
    let bad_exec = d.req("POST", &format!("/v1/sandboxes/{id}/exec"), &t, Some(json!({"line": "a\nb"})));
    assert_eq!(bad_exec.status, 400);

    // Pause; impossible transitions are 409; exec resumes transparently.
    assert_eq!(d.expect(200, "POST", &format!("/v1/sandboxes/{id}/pause"), &t, None)["state"], "paused");
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{id}/pause"), &t, None).status, 409);
    let a = d.exec(&t, &id, "count");
    assert_eq!((a.body["lines"][0].as_str(), a.came_up.as_deref()), (Some("count 2"), Some("resumed")));
    assert!(a.wake_ms.unwrap().parse::<f64>().unwrap() > 0.0);
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{id}/resume"), &t, None).status, 409);

    // Hibernate; exec wakes it with its memory intact.
    assert_eq!(d.expect(200, "POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None)["state"], "hibernated");
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None).status, 409);
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{id}/pause"), &t, None).status, 409);
    let a = d.exec(&t, &id, "count");
    assert_eq!((a.body["lines"][0].as_str(), a.came_up.as_deref()), (Some("count 3"), Some("woken")));

    // Concurrent requests for a sleeping sandbox wake it exactly once.
    d.expect(200, "POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None);
    let since = d.last_event(&t, &id);
    let ups: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| d.exec(&t, &id, "ping").came_up.unwrap())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ups.iter().filter(|u| *u == "woken").count(), 1, "{ups:?}");
    assert_eq!(ups.iter().filter(|u| *u == "running").count(), 3, "{ups:?}");
    let evs = d.expect(200, "GET", &format!("/v1/sandboxes/{id}/events"), &t, None);
    let woken =
        evs["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "woken" && e["id"].as_i64() > Some(since));
    assert_eq!(woken.count(), 1);

    // Fork: children are running sandboxes with the parent's memory; the tree shows them.
    let f = d.expect(201, "POST", &format!("/v1/sandboxes/{id}/fork"), &t, Some(json!({"count": 2})));
    let kids: Vec<String> =
        f["sandboxes"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().into()).collect();
    assert_eq!(kids.len(), 2);
    for k in &kids {
        assert_eq!(d.line(&t, k, "count"), "count 4");
        assert_eq!(d.line(&t, k, "gen").split_whitespace().count(), 2);
    }
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{id}/fork"), &t, Some(json!({"count": 0}))).status, 400);
    let tree = d.expect(200, "GET", &format!("/v1/sandboxes/{id}/tree"), &t, None);
    let mut ids: Vec<&str> = tree["children"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, kids.iter().map(String::as_str).collect::<Vec<_>>());

    // Template from a sandbox; sandboxes created from it continue from the snapshot.
    let tpl = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": kids[0], "name": "t1"})));
    let tid = tpl["id"].as_str().unwrap();
    assert_eq!(d.expect(200, "GET", &format!("/v1/templates/{tid}"), &t, None)["name"], "t1");
    let c1 = d.create(&t, json!({"template": tid}));
    let c2 = d.create(&t, json!({"template": tid}));
    assert_eq!(d.line(&t, &c1, "count"), "count 5");
    assert_eq!(d.line(&t, &c2, "count"), "count 5");
    let bad = d.req("POST", "/v1/sandboxes", &t, Some(json!({"template": tid, "memory_mib": 128})));
    assert_eq!(bad.status, 400);

    // List: filters and pagination.
    let all = d.expect(200, "GET", "/v1/sandboxes?limit=1000", &t, None);
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 5);
    let from_tpl = d.expect(200, "GET", &format!("/v1/sandboxes?template={tid}"), &t, None);
    assert_eq!(from_tpl["sandboxes"].as_array().unwrap().len(), 2);
    let mut seen = Vec::new();
    let mut path = "/v1/sandboxes?limit=2".to_string();
    loop {
        let page = d.expect(200, "GET", &path, &t, None);
        seen.extend(page["sandboxes"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/sandboxes?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let kids_of = d.expect(200, "GET", &format!("/v1/sandboxes?parent={id}&state=running"), &t, None);
    assert_eq!(kids_of["sandboxes"].as_array().unwrap().len(), 2);

    // Delete: the VMM goes, the id is gone; metrics count what is left.
    let dir_before = d.vm_dirs().len();
    assert_eq!(d.req("DELETE", &format!("/v1/sandboxes/{c2}"), &t, None).status, 204);
    assert_eq!(d.req("GET", &format!("/v1/sandboxes/{c2}"), &t, None).status, 404);
    assert_eq!(d.vm_dirs().len(), dir_before - 1);
    let m = d.raw("GET", "/metrics", None, None).body;
    let m = m.as_str().unwrap();
    assert!(m.contains("forkvm_sandboxes{state=\"running\"} 4"), "{m}");
    assert!(m.contains("forkvm_wake_ms_count{kind=\"woken\"} 2"), "{m}");
    assert!(m.contains("forkvm_create_ms_count{source=\"template\"} 2"), "{m}");
    assert!(m.contains("forkvm_vmm_memory_shared_bytes"), "{m}");
}

#[test]
fn privacy_and_workspaces() {
    let d = Daemon::start("priv");
    let (a, b) = (d.token("alpha"), d.token("beta"));
    let private = d.create(&a, json!({}));
    let unlisted = d.create(&a, json!({"privacy": "unlisted"}));
    let public = d.create(&a, json!({"privacy": "public"}));

    // Private: invisible to beta (404 everywhere), forkable inside alpha.
    for (m, p) in [("GET", ""), ("GET", "/tree"), ("POST", "/pause"), ("DELETE", "")] {
        assert_eq!(d.req(m, &format!("/v1/sandboxes/{private}{p}"), &b, None).status, 404, "{m} {p}");
    }
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{private}/exec"), &b, Some(json!({"line": "ping"}))).status, 404);
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{private}/fork"), &b, Some(json!({}))).status, 404);
    d.expect(201, "POST", &format!("/v1/sandboxes/{private}/fork"), &a, Some(json!({})));

    // Unlisted: readable by id, never listed for beta, never live-forked into beta.
    assert_eq!(d.expect(200, "GET", &format!("/v1/sandboxes/{unlisted}"), &b, None)["workspace"], "alpha");
    let refused = d.req("POST", &format!("/v1/sandboxes/{unlisted}/fork"), &b, Some(json!({})));
    assert_eq!(refused.status, 403);
    let why = refused.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("unlisted") && why.contains("template"), "{why}");
    assert_eq!(d.req("POST", &format!("/v1/sandboxes/{unlisted}/pause"), &b, None).status, 403);

    // Public: any token may fork it; the child lives in the forker's workspace.
    let f = d.expect(201, "POST", &format!("/v1/sandboxes/{public}/fork"), &b, Some(json!({})));
    assert_eq!(f["sandboxes"][0]["workspace"], "beta");
    assert_eq!(f["sandboxes"][0]["privacy"], "private");
    let listed = d.expect(200, "GET", "/v1/sandboxes", &b, None);
    assert_eq!(listed["sandboxes"].as_array().unwrap().len(), 1, "beta lists only its own: {listed}");
    assert_eq!(d.req("DELETE", &format!("/v1/sandboxes/{public}"), &b, None).status, 403);

    // Templates: a private template is invisible to beta; a public one may be used.
    let tp = d.expect(201, "POST", "/v1/templates", &a, Some(json!({"sandbox": private})));
    let tp = tp["id"].as_str().unwrap();
    assert_eq!(d.req("POST", "/v1/sandboxes", &b, Some(json!({"template": tp}))).status, 404);
    let tpub = d.expect(201, "POST", "/v1/templates", &a, Some(json!({"sandbox": unlisted, "privacy": "public"})));
    let from = d.create(&b, json!({"template": tpub["id"]}));
    assert_eq!(d.line(&b, &from, "ping"), "pong");
    assert_eq!(d.req("POST", "/v1/templates", &b, Some(json!({"sandbox": private}))).status, 404);
}

#[test]
fn fork_children_names_stay_unique_across_forks_of_a_parent() {
    let mut d = Daemon::start("forknames");
    let t = d.token("ws1");
    let id = d.create(&t, json!({"name": "p", "policy": {"pause_after": 0, "hibernate_after": 0}}));
    let fork = |d: &Daemon, count: usize| -> Vec<(String, String)> {
        let f = d.expect(201, "POST", &format!("/v1/sandboxes/{id}/fork"), &t, Some(json!({"count": count})));
        let kids = f["sandboxes"].as_array().unwrap().iter();
        kids.map(|s| (s["id"].as_str().unwrap().to_string(), s["name"].as_str().unwrap().to_string())).collect()
    };
    let names = |kids: &[(String, String)]| kids.iter().map(|k| k.1.clone()).collect::<Vec<_>>();
    let first = fork(&d, 2);
    assert_eq!(names(&first), ["p-fork1", "p-fork2"]);
    // The counter goes on: deleting the newest child does not free its name either.
    assert_eq!(d.req("DELETE", &format!("/v1/sandboxes/{}", first[1].0), &t, None).status, 204);
    assert_eq!(names(&fork(&d, 2)), ["p-fork3", "p-fork4"]);
    // ...and survives a daemon restart.
    d.restart();
    assert_eq!(names(&fork(&d, 1)), ["p-fork5"]);
    let all = d.expect(200, "GET", &format!("/v1/sandboxes?parent={id}"), &t, None);
    let mut listed: Vec<&str> =
        all["sandboxes"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, ["p-fork1", "p-fork3", "p-fork4", "p-fork5"]);
}
