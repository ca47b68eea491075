//! Property test: random request sequences against a real daemon; after every request the
//! database (as the API reports it) and the VMM processes agree about every sandbox.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::Daemon;
use forkvm_api::vm::{Client, RunState, Status};
use proptest::prelude::*;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
enum Op {
    Create,
    Pause(usize),
    Resume(usize),
    Hibernate(usize),
    Exec(usize),
    Fork(usize),
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Pause),
        2 => any::<usize>().prop_map(Op::Resume),
        2 => any::<usize>().prop_map(Op::Hibernate),
        3 => any::<usize>().prop_map(Op::Exec),
        1 => any::<usize>().prop_map(Op::Fork),
        1 => any::<usize>().prop_map(Op::Delete),
    ]
}

fn list(d: &Daemon, t: &str) -> Vec<Value> {
    d.expect(200, "GET", "/v1/sandboxes?limit=1000", t, None)["sandboxes"].as_array().unwrap().clone()
}

/// The API's view and the VMMs' agree, and no VMM runs without a sandbox row.
fn check(d: &Daemon, tokens: &[String]) {
    let mut known = Vec::new();
    for t in tokens {
        for s in list(d, t) {
            let id = s["id"].as_str().unwrap().to_string();
            let dir = d.run.join(&id);
            let status = Client::at(&dir, &id).call(Status {});
            match s["state"].as_str().unwrap() {
                st @ ("running" | "paused") => {
                    let v = status.unwrap_or_else(|e| panic!("{id} is {st} in the db but its VMM: {e}"));
                    let want = if st == "running" { RunState::Running } else { RunState::Paused };
                    assert_eq!(v.state, want, "{id}");
                    assert_eq!(Some(u64::from(v.pid)), s["pid"].as_u64(), "{id}");
                }
                "hibernated" => {
                    assert!(status.is_err(), "{id} is hibernated in the db but a VMM answers");
                    assert!(dir.join("hibernated").exists(), "{id}: no hibernation on disk");
                }
                other => panic!("{id} is {other}"),
            }
            known.push(id);
        }
    }
    for name in d.vm_dirs() {
        if Client::at(&d.run.join(&name), &name).call(Status {}).is_ok() {
            assert!(known.contains(&name), "VMM {name} runs without a sandbox in the db");
        }
    }
}

#[test]
fn database_and_vmms_never_disagree() {
    let d = Daemon::start("prop");
    let tokens = std::cell::RefCell::new(Vec::new());
    let cfg = ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(cfg, |(ops in proptest::collection::vec(op(), 1..16))| {
        let t = d.token(&format!("ws{}", tokens.borrow().len()));
        tokens.borrow_mut().push(t.clone());
        let never = json!({"policy": {"pause_after": 0, "hibernate_after": 0}});
        for op in ops {
            let ids: Vec<String> = list(&d, &t).iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
            let pick = |i: usize| ids.get(i % ids.len().max(1)).cloned();
            let path = |i: usize, what: &str| pick(i).map(|id| format!("/v1/sandboxes/{id}{what}"));
            let answer = match &op {
                Op::Create => Some(d.req("POST", "/v1/sandboxes", &t, Some(never.clone()))),
                Op::Pause(i) => path(*i, "/pause").map(|p| d.req("POST", &p, &t, None)),
                Op::Resume(i) => path(*i, "/resume").map(|p| d.req("POST", &p, &t, None)),
                Op::Hibernate(i) => path(*i, "/hibernate").map(|p| d.req("POST", &p, &t, None)),
                Op::Exec(i) => path(*i, "/exec").map(|p| d.req("POST", &p, &t, Some(json!({"line": "ping"})))),
                Op::Fork(i) => path(*i, "/fork").map(|p| d.req("POST", &p, &t, Some(json!({"count": 1})))),
                Op::Delete(i) => path(*i, "").map(|p| d.req("DELETE", &p, &t, None)),
            };
            if let Some(a) = answer {
                prop_assert!([200, 201, 204, 409].contains(&a.status), "{op:?}: {} {}", a.status, a.body);
                if let Op::Exec(_) = op {
                    if a.status == 200 {
                        prop_assert_eq!(a.body["lines"][0].as_str(), Some("pong"));
                    }
                }
            }
            check(&d, &tokens.borrow());
        }
    });
}
