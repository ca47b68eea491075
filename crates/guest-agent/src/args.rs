//! Command-line parsing (no clap: the agent stays tiny).

use crate::error::AgentError;

/// Longest seed accepted, in bytes (the kernel accepts more; a clone needs 32).
pub const MAX_SEED: usize = 256;

/// Where `serve` listens.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Listen {
    Vsock(u32),
    Unix(std::path::PathBuf),
}

/// Options of `forkvm-agent serve`.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct ServeOpts {
    pub listen: Listen,
    /// User hooks run by the clone hook (executables, in name order).
    pub hooks_dir: std::path::PathBuf,
    /// Do not step CLOCK_REALTIME (host tests).
    pub no_clock: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    /// Serve the agent protocol until killed.
    Serve(ServeOpts),
    /// Credit `seed` to the input pool and reseed the CRNG; `generation` is only reported.
    Reseed {
        seed: Vec<u8>,
        generation: Option<u64>,
    },
}

pub fn parse(argv: &[String]) -> Result<Command, AgentError> {
    let Some((cmd, rest)) = argv.split_first() else {
        return Err(AgentError::Usage("no command given".into()));
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "reseed" => {
            let (hex, gen) = match rest {
                [hex] => (hex, None),
                [hex, gen] => (hex, Some(gen)),
                [] => return Err(AgentError::Usage("reseed needs a hex seed".into())),
                _ => return Err(AgentError::Usage("reseed takes a hex seed and an optional generation".into())),
            };
            let seed = parse_hex(hex)?;
            let generation = gen
                .map(|g| g.parse::<u64>().map_err(|_| AgentError::Usage(format!("generation {g:?} is not a number"))))
                .transpose()?;
            Ok(Command::Reseed { seed, generation })
        }
        "serve" => parse_serve(rest).map(Command::Serve),
        other => Err(AgentError::Usage(format!("unknown command {other:?}"))),
    }
}

fn parse_serve(rest: &[String]) -> Result<ServeOpts, AgentError> {
    let mut o = ServeOpts {
        listen: Listen::Vsock(agent_proto::AGENT_PORT),
        hooks_dir: "/etc/forkvm/hooks.d".into(),
        no_clock: false,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value =
            |what: &str| it.next().cloned().ok_or_else(|| AgentError::Usage(format!("{what} needs a value")));
        match a.as_str() {
            "--unix" => o.listen = Listen::Unix(value("--unix")?.into()),
            "--port" => {
                let v = value("--port")?;
                let p = v.parse().map_err(|_| AgentError::Usage(format!("port {v:?} is not a number")))?;
                o.listen = Listen::Vsock(p);
            }
            "--hooks-dir" => o.hooks_dir = value("--hooks-dir")?.into(),
            "--no-clock" => o.no_clock = true,
            other => return Err(AgentError::Usage(format!("unknown serve option {other:?}"))),
        }
    }
    Ok(o)
}

/// Decodes an even-length hex string of 1..=MAX_SEED bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, AgentError> {
    if s.is_empty() {
        return Err(AgentError::Seed("empty".into()));
    }
    if s.len() % 2 != 0 {
        return Err(AgentError::Seed(format!("odd number of hex digits ({})", s.len())));
    }
    if s.len() / 2 > MAX_SEED {
        return Err(AgentError::Seed(format!("{} bytes, at most {MAX_SEED} allowed", s.len() / 2)));
    }
    let digit = |i: usize, c: u8| -> Result<u8, AgentError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(AgentError::Seed(format!("{:?} at position {i} is not a hex digit", char::from(c)))),
        }
    };
    s.as_bytes()
        .chunks_exact(2)
        .enumerate()
        .map(|(i, p)| Ok(digit(2 * i, p[0])? << 4 | digit(2 * i + 1, p[1])?))
        .collect()
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reseed_with_and_without_generation() {
        assert_eq!(
            parse(&argv(&["reseed", "00ff10Ab"])).ok(),
            Some(Command::Reseed { seed: vec![0, 0xff, 0x10, 0xab], generation: None })
        );
        assert_eq!(
            parse(&argv(&["reseed", "01", "7"])).ok(),
            Some(Command::Reseed { seed: vec![1], generation: Some(7) })
        );
        assert_eq!(parse(&argv(&["--help"])).ok(), Some(Command::Help));
    }

    #[test]
    fn serve_options() {
        let Ok(Command::Serve(o)) = parse(&argv(&["serve"])) else { panic!("serve") };
        assert_eq!(o.listen, Listen::Vsock(52));
        assert!(!o.no_clock);
        let Ok(Command::Serve(o)) = parse(&argv(&["serve", "--unix", "/s", "--no-clock", "--hooks-dir", "/h"])) else {
            panic!("serve --unix")
        };
        assert_eq!((o.listen, o.no_clock, o.hooks_dir), (Listen::Unix("/s".into()), true, "/h".into()));
        for bad in [&["serve", "--unix"][..], &["serve", "--port", "x"], &["serve", "--frob"]] {
            assert!(matches!(parse(&argv(bad)), Err(AgentError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn bad_hex_is_a_clear_seed_error() {
        for (hex, want) in [
            ("", "empty"),
            ("abc", "odd number of hex digits"),
            ("zz", "'z' at position 0 is not a hex digit"),
            ("0g", "'g' at position 1 is not a hex digit"),
        ] {
            let e = parse(&argv(&["reseed", hex])).err().map(|e| (e.to_string(), e.exit_code()));
            let (msg, code) = e.unwrap_or_default();
            assert!(msg.contains(want), "{hex:?}: {msg}");
            assert_eq!(code, 2);
        }
        let long = "00".repeat(MAX_SEED + 1);
        assert!(matches!(parse_hex(&long), Err(AgentError::Seed(_))));
        assert_eq!(parse_hex(&"ab".repeat(MAX_SEED)).map(|v| v.len()).ok(), Some(MAX_SEED));
    }

    #[test]
    fn bad_usage_exits_non_zero() {
        for a in [&[][..], &["reseed"], &["reseed", "00", "x"], &["reseed", "00", "1", "2"], &["frobnicate"]] {
            let e = parse(&argv(a)).err();
            assert!(matches!(e, Some(AgentError::Usage(_))), "{a:?}: {e:?}");
            assert_eq!(e.map(|e| e.exit_code()), Some(2));
        }
    }
}
