//! `forkvm sandbox|template|repo ...`: clients of the daemon (`forkvm serve`) over its Unix
//! socket, authenticated by `$FORKVM_TOKEN`.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::daemon_client::Client;

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Create a sandbox: boot the test guest (or a host-registered --image), or restore a
    /// template (copy-on-write).
    Create(CreateArgs),
    /// List this workspace's sandboxes.
    Ls {
        /// Only sandboxes in this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// Print a sandbox as JSON.
    Get { id: String },
    /// Send a line to the guest console (wakes a paused or hibernated sandbox first); its
    /// answer on stdout, how it came up (running, resumed, woken) on stderr.
    Exec {
        id: String,
        /// The line (words are joined with spaces).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        line: Vec<String>,
        /// Print console lines until one contains this text (default: the next line).
        #[arg(long)]
        wait_for: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Live fork into N running children.
    Fork {
        id: String,
        /// Number of children.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Pause a running sandbox (its vCPUs parked, memory kept).
    Pause { id: String },
    /// Hibernate a sandbox: its memory into the chunk store, its VMM gone (woken on use).
    Hibernate { id: String },
    /// Resume a paused sandbox, wake a hibernated one.
    Resume { id: String },
    /// Delete a sandbox (stops its VMM).
    Rm { id: String },
    /// Print the clone tree under a sandbox.
    Tree { id: String },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Restore this template (tpl-...) instead of booting.
    #[arg(long)]
    pub template: Option<String>,
    /// A name to show (default: the id).
    #[arg(long)]
    pub name: Option<String>,
    /// Boot a kernel image the daemon was started with (`forkvm serve --image NAME=...`).
    #[arg(long, conflicts_with = "template")]
    pub image: Option<String>,
    /// Guest memory in MiB (boots only).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// vCPUs (boots only).
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// private, unlisted or public.
    #[arg(long)]
    pub privacy: Option<String>,
    /// Boot with a virtio-net device in a private network namespace (previews reach its ports).
    #[arg(long, conflicts_with = "template")]
    pub net: bool,
    /// Seconds idle before the policy pauses it (0 = never).
    #[arg(long)]
    pub pause_after: Option<u64>,
    /// Seconds paused before the policy hibernates it (0 = never).
    #[arg(long)]
    pub hibernate_after: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Snapshot a sandbox into an immutable template.
    Create {
        /// The sandbox to snapshot (sb-...).
        sandbox: String,
        /// A name to show (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// private, unlisted or public (default: private).
        #[arg(long)]
        privacy: Option<String>,
    },
    /// List this workspace's templates and the public ones.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Preload a sandbox for each pull request of OWNER/NAME (point GitHub's webhook at
    /// /v1/hooks/github with the same secret).
    Add {
        /// OWNER/NAME, as GitHub names the repository.
        repo: String,
        /// The template each pull request's sandbox is created from.
        #[arg(long)]
        template: String,
        /// The webhook's secret (checks X-Hub-Signature-256).
        #[arg(long)]
        secret: String,
        /// A console line run in each new PR sandbox before it is paused.
        #[arg(long)]
        setup: Option<String>,
    },
    /// Print pull request N's sandbox, woken and running.
    Open { repo: String, number: u64 },
}

fn print(v: &Value) -> Result<i32, String> {
    println!("{}", serde_json::to_string_pretty(v).map_err(|e| e.to_string())?);
    Ok(0)
}

fn came_up(a: &crate::daemon_client::Answer) {
    if let (Some(c), Some(ms)) = (&a.came_up, &a.wake_ms) {
        eprintln!("({c}, {ms} ms)");
    }
}

/// The header of `forkvm sandbox ls`; [`ls_row`] lines up under it.
fn ls_header() -> String {
    format!("{:<20} {:<11} {:>7} {:<20} {:<20} NAME", "ID", "STATE", "MEM_MIB", "TEMPLATE", "PARENT")
}

/// One sandbox as a line of `forkvm sandbox ls`.
fn ls_row(s: &Value) -> String {
    let f = |k: &str| s[k].as_str().unwrap_or("-").to_string();
    format!(
        "{:<20} {:<11} {:>7} {:<20} {:<20} {}",
        f("id"),
        f("state"),
        // A JSON value ignores width and alignment: format the number (or "-") itself.
        s["memory_mib"].as_u64().map_or_else(|| "-".to_string(), |m| m.to_string()),
        f("template"),
        f("parent"),
        f("name")
    )
}

pub fn sandbox(cmd: SandboxCmd) -> Result<i32, String> {
    let c = Client::from_env()?;
    let post = |path: String, body: Value| c.call("POST", &path, Some(&body));
    match cmd {
        SandboxCmd::Create(a) => {
            let mut body = json!({"name": a.name, "template": a.template, "image": a.image,
                "memory_mib": a.memory_mib, "vcpus": a.vcpus, "privacy": a.privacy});
            if a.net {
                body["net"] = json!(true);
            }
            if a.pause_after.is_some() || a.hibernate_after.is_some() {
                let d = forkvm_api::v1::Policy::default();
                body["policy"] = json!({"pause_after": a.pause_after.unwrap_or(d.pause_after),
                    "hibernate_after": a.hibernate_after.unwrap_or(d.hibernate_after)});
            }
            print(&post("/v1/sandboxes".into(), body)?.body)
        }
        SandboxCmd::Ls { state } => {
            let mut cursor: Option<String> = None;
            let mut header = Some(ls_header());
            loop {
                let mut path = "/v1/sandboxes?limit=1000".to_string();
                if let Some(s) = &state {
                    path.push_str(&format!("&state={s}"));
                }
                if let Some(cur) = &cursor {
                    path.push_str(&format!("&cursor={cur}"));
                }
                let page = c.call("GET", &path, None)?.body;
                if let Some(h) = header.take() {
                    println!("{h}"); // once the daemon answered: a failed list prints only its error
                }
                for s in page["sandboxes"].as_array().into_iter().flatten() {
                    println!("{}", ls_row(s));
                }
                match page["next_cursor"].as_str() {
                    Some(n) => cursor = Some(n.to_string()),
                    None => return Ok(0),
                }
            }
        }
        SandboxCmd::Get { id } => print(&c.call("GET", &format!("/v1/sandboxes/{id}"), None)?.body),
        SandboxCmd::Exec { id, line, wait_for, timeout } => {
            let body = json!({"line": line.join(" "), "wait_for": wait_for, "timeout_ms": timeout * 1000});
            let a = post(format!("/v1/sandboxes/{id}/exec"), body)?;
            came_up(&a);
            for l in a.body["lines"].as_array().into_iter().flatten() {
                println!("{}", l.as_str().unwrap_or_default());
            }
            Ok(0)
        }
        SandboxCmd::Fork { id, count } => {
            let a = post(format!("/v1/sandboxes/{id}/fork"), json!({"count": count}))?;
            for s in a.body["sandboxes"].as_array().into_iter().flatten() {
                println!("{} pid {}", s["id"].as_str().unwrap_or("?"), s["pid"]);
            }
            eprintln!("forked in {:.3} ms", a.body["fork_ms"].as_f64().unwrap_or(f64::NAN));
            Ok(0)
        }
        SandboxCmd::Pause { id } => print(&post(format!("/v1/sandboxes/{id}/pause"), Value::Null)?.body),
        SandboxCmd::Hibernate { id } => print(&post(format!("/v1/sandboxes/{id}/hibernate"), Value::Null)?.body),
        SandboxCmd::Resume { id } => {
            let a = post(format!("/v1/sandboxes/{id}/resume"), Value::Null)?;
            came_up(&a);
            print(&a.body["sandbox"])
        }
        SandboxCmd::Rm { id } => {
            c.call("DELETE", &format!("/v1/sandboxes/{id}"), None)?;
            println!("{id}: deleted");
            Ok(0)
        }
        SandboxCmd::Tree { id } => {
            fn walk(n: &Value, depth: usize) {
                let s = |k: &str| n[k].as_str().unwrap_or("?");
                println!("{}{} {} ({})", "  ".repeat(depth), s("id"), s("state"), s("name"));
                for ch in n["children"].as_array().into_iter().flatten() {
                    walk(ch, depth + 1);
                }
            }
            walk(&c.call("GET", &format!("/v1/sandboxes/{id}/tree"), None)?.body, 0);
            Ok(0)
        }
    }
}

pub fn template(cmd: TemplateCmd) -> Result<i32, String> {
    let c = Client::from_env()?;
    match cmd {
        TemplateCmd::Create { sandbox, name, privacy } => {
            let body = json!({"sandbox": sandbox, "name": name, "privacy": privacy});
            print(&c.call("POST", "/v1/templates", Some(&body))?.body)
        }
        TemplateCmd::Ls => print(&c.call("GET", "/v1/templates", None)?.body),
    }
}

pub fn repo(cmd: RepoCmd) -> Result<i32, String> {
    let c = Client::from_env()?;
    match cmd {
        RepoCmd::Add { repo, template, secret, setup } => {
            let body = json!({"repo": repo, "template": template, "secret": secret, "setup": setup});
            print(&c.call("POST", "/v1/repos", Some(&body))?.body)
        }
        RepoCmd::Open { repo, number } => {
            let a = c.call("POST", &format!("/v1/repos/{repo}/pulls/{number}/open"), None)?;
            came_up(&a);
            print(&a.body)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ls_rows_line_up_under_the_header() {
        let s = json!({"id": "sb-d3a4e26b2ddb", "state": "paused", "memory_mib": 64, "template": "tpl-009a313588df",
            "parent": null, "name": "first"});
        let (header, row) = (ls_header(), ls_row(&s));
        for (col, value) in [("MEM_MIB", "64"), ("TEMPLATE", "tpl-009a313588df"), ("PARENT", "-"), ("NAME", "first")] {
            let at = header.find(col).unwrap();
            let end = if col == "MEM_MIB" { at + col.len() - value.len() } else { at };
            assert_eq!(row.get(end..end + value.len()), Some(value), "{col} column:\n{header}\n{row}");
        }
    }
}
