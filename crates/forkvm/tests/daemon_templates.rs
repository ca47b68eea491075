//! `DELETE /v1/templates/{id}` against a real daemon: sandboxes created from the template keep
//! running, forking, hibernating and waking after it is gone (their VMMs hold its memory file
//! and disk layers open, and a hibernation moves memory into the chunk store); a repo that
//! preloads pull requests from it keeps it (409); other workspaces cannot delete it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::Daemon;
use serde_json::json;

#[test]
fn deleting_a_template_leaves_its_sandboxes_working() {
    let d = Daemon::start("tpl-delete");
    let t = d.token("ws1");
    let other = d.token("ws2");
    let never = json!({"pause_after": 0, "hibernate_after": 0});
    let src = d.create(&t, json!({"policy": never}));
    assert_eq!(d.line(&t, &src, "count"), "count 1");
    let tid =
        d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": src})))["id"].as_str().unwrap().to_string();
    let dir = d.run.join("forkvmd").join("templates").join(&tid);
    assert!(dir.is_dir(), "{}", dir.display());
    let kid = d.create(&t, json!({"template": tid, "policy": never}));
    assert_eq!(d.line(&t, &kid, "count"), "count 2");

    // Another workspace: not visible (private), so 404.
    assert_eq!(d.req("DELETE", &format!("/v1/templates/{tid}"), &other, None).status, 404);
    // A repo preloading from it keeps it.
    let repo = json!({"repo": "acme/web", "template": tid, "secret": "s3cret"});
    let r = d.req("POST", "/v1/repos", &t, Some(repo));
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    let why = d.expect(409, "DELETE", &format!("/v1/templates/{tid}"), &t, None);
    assert!(why["error"]["message"].as_str().unwrap().contains("acme/web"), "{why}");
    // Re-pointed at another template, the repo lets it go.
    let tid2 = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": src})))["id"].clone();
    let r = d.req("POST", "/v1/repos", &t, Some(json!({"repo": "acme/web", "template": tid2, "secret": "s3cret"})));
    assert!(r.status == 200 || r.status == 201, "{}", r.body);
    d.expect(204, "DELETE", &format!("/v1/templates/{tid}"), &t, None);
    assert!(!dir.exists(), "the template's files are gone");
    d.expect(404, "GET", &format!("/v1/templates/{tid}"), &t, None);
    d.expect(404, "DELETE", &format!("/v1/templates/{tid}"), &t, None);
    d.expect(404, "POST", "/v1/sandboxes", &t, Some(json!({"template": tid})));
    let ids: Vec<String> = d.expect(200, "GET", "/v1/templates", &t, None)["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.contains(&tid));

    // Its sandbox lives on: exec, fork, hibernate and wake.
    assert_eq!(d.line(&t, &kid, "count"), "count 3");
    let f = d.expect(201, "POST", &format!("/v1/sandboxes/{kid}/fork"), &t, Some(json!({})));
    let child = f["sandboxes"][0]["id"].as_str().unwrap_or_else(|| panic!("{f}")).to_string();
    assert_eq!(d.line(&t, &child, "count"), "count 4");
    d.expect(200, "POST", &format!("/v1/sandboxes/{kid}/hibernate"), &t, None);
    let a = d.exec(&t, &kid, "count");
    assert_eq!((a.body["lines"][0].as_str(), a.came_up.as_deref()), (Some("count 4"), Some("woken")));
}

/// `/metrics` counts the page faults that lazily woken sandboxes' page servers served.
#[test]
fn metrics_count_page_server_faults_of_woken_sandboxes() {
    let d = Daemon::start("pagesrv-metric");
    let t = d.token("ws1");
    let id = d.create(&t, json!({"policy": {"pause_after": 0, "hibernate_after": 0}}));
    assert_eq!(d.line(&t, &id, "count"), "count 1");
    let metric = |name: &str| -> Option<f64> {
        let m = d.raw("GET", "/metrics", None, None).body.as_str().unwrap().to_string();
        m.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(metric("forkvm_pagesrv_faults_total "), Some(0.0), "nothing woken yet");
    d.expect(200, "POST", &format!("/v1/sandboxes/{id}/hibernate"), &t, None);
    let a = d.exec(&t, &id, "count");
    assert_eq!(a.came_up.as_deref(), Some("woken"));
    let faults = metric("forkvm_pagesrv_faults_total ").unwrap();
    assert!(faults > 0.0, "the woken guest's pages came from its page server: {faults}");
    assert_eq!(metric("forkvm_pagesrv_sandboxes "), Some(1.0));
    let p99 = metric("forkvm_pagesrv_fault_latency_us{quantile=\"0.99\"} ").unwrap();
    assert!(p99 > 0.0);
    // A counter: a second scrape never goes down.
    assert!(metric("forkvm_pagesrv_faults_total ").unwrap() >= faults);
}
