//! The daemon's lifecycle policy (short timeouts, waited on through the event stream), kill -9
//! and restart with sandboxes in every state, and the GitHub pull-request webhook.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::Daemon;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

#[test]
fn idle_policy_pauses_then_hibernates_and_exec_wakes() {
    let d = Daemon::start("policy");
    let t = d.token("ws1");
    let id = d.create(&t, json!({"policy": {"pause_after": 1, "hibernate_after": 2}}));
    let keep = d.create(&t, json!({"policy": {"pause_after": 0, "hibernate_after": 0}}));
    assert_eq!(d.line(&t, &id, "count"), "count 1");
    let since = d.last_event(&t, &id);
    let is = |kind: &'static str| {
        let id = id.clone();
        move |e: &Value| e["sandbox"] == id.as_str() && e["kind"] == kind
    };
    let paused = d.wait_event(&t, since, is("paused"));
    assert_eq!(paused["detail"], "policy");
    let hib = d.wait_event(&t, paused["id"].as_i64().unwrap(), is("hibernated"));
    assert_eq!(hib["detail"], "policy");
    assert_eq!(d.state(&t, &id), "hibernated");
    let a = d.exec(&t, &id, "count");
    assert_eq!((a.body["lines"][0].as_str(), a.came_up.as_deref()), (Some("count 2"), Some("woken")));
    // pause_after 0: never paused (the other one went through two transitions meanwhile).
    assert_eq!(d.state(&t, &keep), "running");
}

#[test]
fn kill9_and_restart_readopts_every_state() {
    let mut d = Daemon::start("restart");
    let t = d.token("ws1");
    let never = json!({"policy": {"pause_after": 0, "hibernate_after": 0}});
    let running = d.create(&t, never.clone());
    let paused = d.create(&t, never.clone());
    let hibernated = d.create(&t, never.clone());
    let doomed = d.create(&t, never.clone());
    for id in [&running, &paused, &hibernated, &doomed] {
        assert_eq!(d.line(&t, id, "count"), "count 1");
    }
    d.expect(200, "POST", &format!("/v1/sandboxes/{paused}/pause"), &t, None);
    d.expect(200, "POST", &format!("/v1/sandboxes/{hibernated}/hibernate"), &t, None);
    let doomed_pid = d.expect(200, "GET", &format!("/v1/sandboxes/{doomed}"), &t, None)["pid"].as_i64().unwrap();

    d.kill9();
    // A VMM dies while no daemon watches.
    // SAFETY: sending SIGKILL to a process this test started (through the daemon).
    assert_eq!(unsafe { libc::kill(doomed_pid as i32, libc::SIGKILL) }, 0);
    while std::path::Path::new(&format!("/proc/{doomed_pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{doomed_pid}/stat")).unwrap_or_default().contains(") Z")
    {
        std::thread::yield_now();
    }
    d.restart();

    assert_eq!(d.state(&t, &running), "running");
    assert_eq!(d.state(&t, &paused), "paused");
    assert_eq!(d.state(&t, &hibernated), "hibernated");
    assert_eq!(d.state(&t, &doomed), "crashed");
    let evs = d.expect(200, "GET", &format!("/v1/sandboxes/{doomed}/events"), &t, None);
    let last = evs["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "crashed");
    assert!(last["detail"].as_str().unwrap().contains("while the daemon was down"), "{last}");
    // Nothing lost: each continues where it was.
    let up = |id: &str| {
        let a = d.exec(&t, id, "count");
        (a.body["lines"][0].as_str().unwrap().to_string(), a.came_up.unwrap())
    };
    assert_eq!(up(&running), ("count 2".into(), "running".into()));
    assert_eq!(up(&paused), ("count 2".into(), "resumed".into()));
    assert_eq!(up(&hibernated), ("count 2".into(), "woken".into()));
    let dead = d.req("POST", &format!("/v1/sandboxes/{doomed}/exec"), &t, Some(json!({"line": "ping"})));
    assert_eq!(dead.status, 409);
    assert_eq!(d.req("DELETE", &format!("/v1/sandboxes/{doomed}"), &t, None).status, 204);
}

fn sign(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn hook(d: &Daemon, delivery: &str, sig: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/v1/hooks/github", d.base))
        .header("X-GitHub-Event", "pull_request")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", sig)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

fn pr(action: &str, number: u64, sha: &str) -> String {
    json!({"action": action, "number": number, "repository": {"full_name": "acme/web"},
        "pull_request": {"number": number, "head": {"sha": sha}}})
    .to_string()
}

#[test]
fn github_webhook_preloads_pull_requests() {
    let d = Daemon::start("hook");
    let t = d.token("ws1");
    let base = d.create(&t, json!({}));
    assert_eq!(d.line(&t, &base, "count"), "count 1");
    let tpl = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": base})))["id"].clone();
    d.expect(
        201,
        "POST",
        "/v1/repos",
        &t,
        Some(json!({"repo": "acme/web", "template": tpl, "setup": "count", "secret": "s3"})),
    );
    assert_eq!(
        d.req("POST", "/v1/repos", &t, Some(json!({"repo": "nope", "template": tpl, "secret": "x"}))).status,
        400
    );
    let count = || d.expect(200, "GET", "/v1/sandboxes", &t, None)["sandboxes"].as_array().unwrap().len();
    assert_eq!(count(), 1);

    // Bad signatures: 401, nothing created.
    let body = pr("opened", 7, "aaa");
    for sig in ["sha256=00", &sign("wrong", &body), "", &sign("s3", &pr("opened", 8, "aaa"))] {
        assert_eq!(hook(&d, "d-bad", sig, &body).0, 401, "{sig}");
    }
    assert_eq!(count(), 1);

    // Opened: created in the background from the template, setup run, then paused.
    let since = d.last_event(&t, &base);
    let (status, out) = hook(&d, "d-1", &sign("s3", &body), &body);
    assert_eq!((status, out["outcome"].as_str()), (202, Some("created")), "{out}");
    let sb = out["sandbox"].as_str().unwrap().to_string();
    let paused = d.wait_event(&t, since, |e| e["sandbox"] == sb.as_str() && e["kind"] == "paused");
    assert_eq!(paused["detail"], "preloaded");
    // A replayed delivery changes nothing.
    let (status, out) = hook(&d, "d-1", &sign("s3", &body), &body);
    assert_eq!((status, out["outcome"].as_str()), (200, Some("replayed")));
    assert_eq!(count(), 2);

    // Open returns it running (resumed), with the setup's effect in memory.
    let o = d.req("POST", "/v1/repos/acme/web/pulls/7/open", &t, None);
    assert_eq!((o.status, o.came_up.as_deref()), (200, Some("resumed")), "{}", o.body);
    assert_eq!(o.body["sandbox"]["id"], sb.as_str());
    assert_eq!(d.line(&t, &sb, "count"), "count 3");
    // A pull request whose webhook has not come: 404 saying what makes its sandbox.
    let o = d.req("POST", "/v1/repos/acme/web/pulls/99/open", &t, None);
    assert_eq!(o.status, 404);
    let msg = o.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("acme/web#99") && msg.contains("/v1/hooks/github"), "{msg}");
    // Another workspace's repo is no repo of yours (as one that does not exist).
    let other = d.token("ws2");
    let o = d.req("POST", "/v1/repos/acme/web/pulls/7/open", &other, None);
    assert_eq!(o.status, 404);
    assert_eq!(o.body["error"]["message"], "no repo acme/web in this workspace (forkvm repo add)");
    let o = d.req("POST", "/v1/repos/acme/nope/pulls/7/open", &t, None);
    assert_eq!(o.body["error"]["message"], "no repo acme/nope in this workspace (forkvm repo add)");

    // Synchronize with a new head: a fresh sandbox replaces the old one.
    let body = pr("synchronize", 7, "bbb");
    let (status, out) = hook(&d, "d-2", &sign("s3", &body), &body);
    assert_eq!((status, out["outcome"].as_str()), (202, Some("refreshed")), "{out}");
    let sb2 = out["sandbox"].as_str().unwrap().to_string();
    assert_ne!(sb2, sb);
    let o = d.req("POST", "/v1/repos/acme/web/pulls/7/open", &t, None);
    assert_eq!(
        (o.status, o.body["sandbox"]["id"].as_str(), o.body["head_sha"].as_str()),
        (200, Some(sb2.as_str()), Some("bbb"))
    );
    assert_eq!(d.req("GET", &format!("/v1/sandboxes/{sb}"), &t, None).status, 404);

    // Closed: deleted.
    let body = pr("closed", 7, "bbb");
    let (status, out) = hook(&d, "d-3", &sign("s3", &body), &body);
    assert_eq!((status, out["outcome"].as_str()), (200, Some("deleted")));
    assert_eq!(d.req("GET", &format!("/v1/sandboxes/{sb2}"), &t, None).status, 404);
    assert_eq!(count(), 1);
}
