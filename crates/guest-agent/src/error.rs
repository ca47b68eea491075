//! What can go wrong in the agent, each with the exit code it leaves with.

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error("invalid seed: {0}")]
    Seed(String),
    #[error("{what}: {err}")]
    Os { what: &'static str, err: std::io::Error },
}

impl AgentError {
    /// True for errors in how the agent was called (the usage line helps).
    pub fn is_usage(&self) -> bool {
        matches!(self, AgentError::Usage(_) | AgentError::Seed(_))
    }

    /// 2 for bad arguments, 1 for failures of the system calls.
    pub fn exit_code(&self) -> i32 {
        if self.is_usage() {
            2
        } else {
            1
        }
    }
}
