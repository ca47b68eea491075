//! On start: re-adopt every sandbox whose VMM outlived the previous daemon; a VMM that died
//! while the daemon was down makes its sandbox `crashed`, with an event.

use forkvm_api::v1::SandboxState;
use forkvm_api::vm::RunState;

use crate::app::App;
use crate::db::sandboxes;
use crate::error::ApiResult;

pub async fn readopt(app: &App) -> ApiResult<usize> {
    use SandboxState::*;
    let recs = sandboxes::in_states(&app.db.lock(), &[Creating, Running, Paused, Hibernated])?;
    let mut n = 0;
    for rec in recs {
        let id = &rec.sb.id;
        let status = match rec.sb.state {
            Hibernated => None,
            _ => app.vmms.status(id).await,
        };
        match (rec.sb.state, status) {
            (Hibernated, _) if app.vmms.is_hibernated(id) => {
                app.event_in(
                    &app.db.lock(),
                    &rec.sb.workspace,
                    id,
                    "readopted",
                    Some(Hibernated),
                    Some(Hibernated),
                    "",
                )?;
                n += 1;
            }
            (_, Some((pid, state))) if state != RunState::Exited => {
                let to = if state == RunState::Running { Running } else { Paused };
                app.transition(&rec, to, Some(pid), "readopted", &format!("pid {pid}"))?;
                n += 1;
            }
            _ if app.vmms.is_hibernated(id) && rec.sb.state != Hibernated => {
                // The daemon died mid-hibernation, after the VMM finished.
                app.transition(&rec, Hibernated, None, "hibernated", "found hibernated after a daemon restart")?;
                n += 1;
            }
            _ => {
                let why = "its VMM died while the daemon was down";
                app.transition(&rec, Crashed, None, "crashed", why)?;
            }
        }
    }
    Ok(n)
}
