//! The flags of a service, each also read from a `KCL_*` environment variable.
//!
//! | flag | environment | default |
//! |---|---|---|
//! | `--stream <NAME>` | `KCL_STREAM` | required |
//! | `--app <NAME>` | `KCL_APP` | required (also the lease table's name) |
//! | `--table <NAME>` | `KCL_TABLE` | the application name |
//! | `--worker-id <ID>` | `KCL_WORKER_ID` | host name plus a random suffix |
//! | `--position <POS>` | `KCL_POSITION` | `trim-horizon` |
//!
//! A flag wins over its variable, which wins over the service's default
//! ([`Service::default_app`](super::Service::default_app) and friends). An empty variable
//! counts as unset. `--position` is `trim-horizon`, `latest` or `at-timestamp=<RFC 3339>`
//! ([`parse_position`]).

use std::ffi::OsString;

use clap::{Arg, Command};

use crate::config::{ConfigError, InitialPosition, WorkerConfig};
use crate::lease::WorkerId;
use crate::worker::WorkerBuilder;

/// A `--position` value that does not parse; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPosition(String);

/// Parses a start position: `trim-horizon`, `latest` or `at-timestamp=<RFC 3339>` (e.g.
/// `at-timestamp=2026-11-25T10:00:00Z`). The `kcl` CLI's `--position` uses it too.
///
/// ```
/// use kcl::service::parse_position;
/// use kcl::InitialPosition;
/// assert_eq!(parse_position("latest")?, InitialPosition::Latest);
/// assert!(matches!(parse_position("at-timestamp=2026-11-25T10:00:00Z")?, InitialPosition::AtTimestamp(_)));
/// assert!(parse_position("oldest").is_err());
/// # Ok::<(), kcl::service::InvalidPosition>(())
/// ```
///
/// # Errors
/// [`InvalidPosition`], saying what is expected.
pub fn parse_position(s: &str) -> Result<InitialPosition, InvalidPosition> {
    match s {
        "trim-horizon" => Ok(InitialPosition::TrimHorizon),
        "latest" => Ok(InitialPosition::Latest),
        other => match other.strip_prefix("at-timestamp=") {
            Some(t) => humantime::parse_rfc3339_weak(t)
                .map(InitialPosition::AtTimestamp)
                .map_err(|e| InvalidPosition(format!("invalid RFC 3339 timestamp {t:?}: {e}"))),
            None => Err(InvalidPosition(format!(
                "expected trim-horizon, latest or at-timestamp=<RFC 3339>, got {other:?}"
            ))),
        },
    }
}

/// A flag: its id (also its long name), its environment variable, its help.
struct Flag {
    id: &'static str,
    env: &'static str,
    value: &'static str,
    help: &'static str,
}

const STREAM: Flag = Flag {
    id: "stream",
    env: "KCL_STREAM",
    value: "NAME",
    help: "The stream to read",
};
const APP: Flag = Flag {
    id: "app",
    env: "KCL_APP",
    value: "NAME",
    help: "The application name: workers with the same name share the stream's shards (also \
           the lease table, unless --table is given)",
};
const TABLE: Flag = Flag {
    id: "table",
    env: "KCL_TABLE",
    value: "NAME",
    help: "The DynamoDB lease table (default: the application name)",
};
const WORKER_ID: Flag = Flag {
    id: "worker-id",
    env: "KCL_WORKER_ID",
    value: "ID",
    help: "This worker's id (default: host name plus a random suffix); a stable id lets a \
           restarted worker reclaim its leases at once",
};
const POSITION: Flag = Flag {
    id: "position",
    env: "KCL_POSITION",
    value: "POS",
    help: "Where shards without a checkpoint start: trim-horizon, latest or \
           at-timestamp=<RFC 3339> (default: trim-horizon)",
};
const FLAGS: [&Flag; 5] = [&STREAM, &APP, &TABLE, &WORKER_ID, &POSITION];

/// Defaults the service sets for its flags (`Service::default_app`, …).
#[derive(Clone, Debug, Default)]
pub(crate) struct Defaults {
    pub(crate) stream: Option<String>,
    pub(crate) app: Option<String>,
    pub(crate) table: Option<String>,
    pub(crate) position: Option<InitialPosition>,
}

/// Where a value came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Flag(&'static str),
    Env(&'static str),
    Default(&'static str),
    Unset,
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Self::Flag(id) => format!("--{id}"),
            Self::Env(var) => var.to_string(),
            Self::Default(id) => format!("--{id} (the service's default)"),
            Self::Unset => "an unset flag".into(),
        }
    }
}

/// Something wrong with the command line or the `KCL_*` variables. Services exit with code 2
/// on it (0 for [`FlagError::Help`]).
///
/// ```
/// use kcl::service::{FlagError, Flags};
///
/// match Flags::parse_from(["svc", "--app", "orders-app"], |_| None) {
///     Err(FlagError::Missing { flag, env }) => assert_eq!((flag, env), ("stream", "KCL_STREAM")),
///     Err(FlagError::Help(text)) => print!("{text}"),
///     Err(other) => eprintln!("error: {other}"),
///     Ok(flags) => println!("reading {}", flags.stream()),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlagError {
    /// `--help` or `--version` was given: print this text (to stdout); not a failure.
    #[error("{0}")]
    Help(String),
    /// The command line does not parse (an unknown flag, a missing value): clap's message,
    /// usage included.
    #[error("{0}")]
    Usage(String),
    /// A required value is neither given as a flag nor in its variable.
    #[error("missing --{flag} (or the environment variable {env})")]
    Missing {
        /// The flag, without `--`.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// A value was rejected; `origin` is the flag (`--stream`) or the variable (`KCL_STREAM`)
    /// it came from.
    #[error("invalid {origin}: {reason}")]
    Invalid {
        /// Where the value came from.
        origin: String,
        /// Why it was rejected.
        reason: String,
    },
}

impl FlagError {
    /// True for [`FlagError::Help`] (`--help`, `--version`).
    pub fn is_help(&self) -> bool {
        matches!(self, Self::Help(_))
    }
}

/// The values of a service's flags (see the [module docs](self)).
///
/// ```
/// use kcl::service::Flags;
///
/// let env = |name: &str| (name == "KCL_APP").then(|| "orders-app".to_string());
/// let flags = Flags::parse_from(["orders", "--stream", "orders", "--position", "latest"], env)?;
/// assert_eq!((flags.stream(), flags.app()), ("orders", "orders-app"));
/// assert_eq!(flags.position(), kcl::InitialPosition::Latest);
/// # Ok::<(), kcl::service::FlagError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Flags {
    stream: String,
    app: String,
    table: Option<String>,
    worker_id: Option<String>,
    position: InitialPosition,
    origins: [Origin; 5],
}

impl Flags {
    /// Parses this process's command line and environment.
    ///
    /// # Errors
    /// As [`Flags::parse_from`].
    pub fn parse() -> Result<Self, FlagError> {
        Self::parse_with(
            std::env::args_os(),
            |name| std::env::var(name).ok(),
            ("kcl-service", ""),
            &Defaults::default(),
        )
    }

    /// Parses `args` (the program name first) with `env` standing for the environment.
    ///
    /// # Errors
    /// [`FlagError`]: `--help`/`--version`, a command line that does not parse, a missing
    /// `--stream`/`--app`, an invalid `--position`, a name the worker would refuse (e.g. a
    /// stream name with a space), naming the flag or variable it came from.
    pub fn parse_from<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::parse_with(args, env, ("kcl-service", ""), &Defaults::default())
    }

    pub(crate) fn parse_with<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
        program: (&'static str, &'static str),
        defaults: &Defaults,
    ) -> Result<Self, FlagError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = command(program, defaults)
            .try_get_matches_from(args)
            .map_err(|e| {
                let text = e.render().to_string();
                match e.kind() {
                    clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion => FlagError::Help(text),
                    _ => FlagError::Usage(text),
                }
            })?;
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let value = |flag: &Flag, default: Option<&String>| -> (Option<String>, Origin) {
            if let Some(v) = matches.get_one::<String>(flag.id) {
                (Some(v.clone()), Origin::Flag(flag.id))
            } else if let Some(v) = env(flag.env) {
                (Some(v), Origin::Env(flag.env))
            } else if let Some(v) = default {
                (Some(v.clone()), Origin::Default(flag.id))
            } else {
                (None, Origin::Unset)
            }
        };
        let required = |flag: &Flag, default: Option<&String>| match value(flag, default) {
            (Some(v), origin) => Ok((v, origin)),
            (None, _) => Err(FlagError::Missing {
                flag: flag.id,
                env: flag.env,
            }),
        };
        let (stream, stream_from) = required(&STREAM, defaults.stream.as_ref())?;
        let (app, app_from) = required(&APP, defaults.app.as_ref())?;
        let (table, table_from) = value(&TABLE, defaults.table.as_ref());
        let (worker_id, worker_id_from) = value(&WORKER_ID, None);
        let (position, position_from) = match value(&POSITION, None) {
            (Some(text), origin) => match parse_position(&text) {
                Ok(p) => (p, origin),
                Err(e) => {
                    return Err(FlagError::Invalid {
                        origin: origin.describe(),
                        reason: e.to_string(),
                    })
                }
            },
            (None, _) => match defaults.position {
                Some(p) => (p, Origin::Default(POSITION.id)),
                None => (InitialPosition::TrimHorizon, Origin::Default(POSITION.id)),
            },
        };
        let flags = Self {
            stream,
            app,
            table,
            worker_id,
            position,
            origins: [
                stream_from,
                app_from,
                table_from,
                worker_id_from,
                position_from,
            ],
        };
        flags.validate()?;
        Ok(flags)
    }

    /// Checks the names as the worker will (before anything is loaded or connected).
    fn validate(&self) -> Result<(), FlagError> {
        let mut cfg = WorkerConfig::new(&self.app, &self.stream);
        if let Some(t) = &self.table {
            cfg.table_name.clone_from(t);
        }
        if let Some(id) = &self.worker_id {
            cfg.worker_id = WorkerId::new(id);
        }
        match cfg.validate() {
            Ok(()) => Ok(()),
            Err(e) => match self.explain(&e) {
                Some(flag_error) => Err(flag_error),
                None => Ok(()),
            },
        }
    }

    /// The stream (`--stream`, `KCL_STREAM`).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The application name (`--app`, `KCL_APP`).
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The lease table, if given (`--table`, `KCL_TABLE`); else the application name.
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The worker id, if given (`--worker-id`, `KCL_WORKER_ID`).
    pub fn worker_id(&self) -> Option<&str> {
        self.worker_id.as_deref()
    }

    /// Where shards without a checkpoint start (`--position`, `KCL_POSITION`).
    pub fn position(&self) -> InitialPosition {
        self.position
    }

    /// Sets the builder's application name, stream, table, worker id and initial position.
    pub fn apply(&self, builder: WorkerBuilder) -> WorkerBuilder {
        let mut b = builder
            .application_name(&self.app)
            .stream(&self.stream)
            .initial_position(self.position);
        if let Some(t) = &self.table {
            b = b.table_name(t);
        }
        if let Some(id) = &self.worker_id {
            b = b.worker_id(id);
        }
        b
    }

    /// The [`FlagError`] for a [`ConfigError`] of a field these flags set (naming the flag or
    /// variable the value came from); `None` for other fields.
    pub fn explain(&self, e: &ConfigError) -> Option<FlagError> {
        let i = match e.field() {
            "stream" => 0,
            "application_name" => 1,
            "table_name" if self.table.is_some() => 2,
            // The table defaults to the application name.
            "table_name" => 1,
            "worker_id" => 3,
            _ => return None,
        };
        Some(FlagError::Invalid {
            origin: self.origins[i].describe(),
            reason: e.reason().to_owned(),
        })
    }
}

fn command(program: (&'static str, &'static str), defaults: &Defaults) -> Command {
    let (name, version) = program;
    let mut cmd = Command::new(name)
        .about("A Kinesis consumer (kcl). Endpoints, region and credentials come from the standard AWS configuration; RUST_LOG sets the log level (default: info).");
    if !version.is_empty() {
        cmd = cmd.version(version);
    }
    for flag in FLAGS {
        let default = match flag.id {
            "stream" => defaults.stream.as_deref(),
            "app" => defaults.app.as_deref(),
            "table" => defaults.table.as_deref(),
            _ => None,
        };
        let help = match default {
            Some(d) => format!("{} [env: {}] [default: {d}]", flag.help, flag.env),
            None => format!("{} [env: {}]", flag.help, flag.env),
        };
        cmd = cmd.arg(
            Arg::new(flag.id)
                .long(flag.id)
                .value_name(flag.value)
                .help(help),
        );
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(args: &[&str], env: &[(&str, &str)], defaults: &Defaults) -> Result<Flags, FlagError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut argv = vec!["svc"];
        argv.extend_from_slice(args);
        Flags::parse_with(argv, |n| env.get(n).cloned(), ("svc", "1.2.3"), defaults)
    }

    #[test]
    fn flags_win_over_variables_which_win_over_defaults() {
        let defaults = Defaults {
            app: Some("default-app".into()),
            stream: Some("default-stream".into()),
            ..Defaults::default()
        };
        let f = parse(&[], &[], &defaults).unwrap();
        assert_eq!((f.stream(), f.app()), ("default-stream", "default-app"));
        assert_eq!(f.table(), None);
        assert_eq!(f.position(), InitialPosition::TrimHorizon);

        let env = [
            ("KCL_STREAM", "env-stream"),
            ("KCL_APP", "env-app"),
            ("KCL_TABLE", "env-table"),
            ("KCL_WORKER_ID", "env-worker"),
            ("KCL_POSITION", "latest"),
        ];
        let f = parse(&[], &env, &defaults).unwrap();
        assert_eq!((f.stream(), f.app()), ("env-stream", "env-app"));
        assert_eq!(
            (f.table(), f.worker_id()),
            (Some("env-table"), Some("env-worker"))
        );
        assert_eq!(f.position(), InitialPosition::Latest);

        let args = [
            "--stream",
            "s",
            "--app=a",
            "--table",
            "tbl",
            "--worker-id",
            "w",
            "--position",
            "at-timestamp=2026-11-25T10:00:00Z",
        ];
        let f = parse(&args, &env, &defaults).unwrap();
        assert_eq!(
            (f.stream(), f.app(), f.table(), f.worker_id()),
            ("s", "a", Some("tbl"), Some("w"))
        );
        assert!(matches!(f.position(), InitialPosition::AtTimestamp(_)));
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let err = parse(&["--app", "a"], &[("KCL_STREAM", "")], &Defaults::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing --stream (or the environment variable KCL_STREAM)"
        );
    }

    #[test]
    fn errors_name_the_flag_or_variable() {
        let d = Defaults::default();
        let err = parse(&["--stream", "s"], &[], &d).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing --app (or the environment variable KCL_APP)"
        );

        let err = parse(
            &["--stream", "s", "--app", "a", "--position", "oldest"],
            &[],
            &d,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --position: expected trim-horizon, latest or at-timestamp=<RFC 3339>, got \"oldest\""
        );
        let err = parse(
            &["--stream", "s", "--app", "a"],
            &[("KCL_POSITION", "at-timestamp=yesterday")],
            &d,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid KCL_POSITION: invalid RFC 3339 timestamp \"yesterday\""),
            "{err}"
        );

        let err = parse(&["--strem", "s"], &[], &d).unwrap_err();
        assert!(matches!(err, FlagError::Usage(_)));
        assert!(err.to_string().contains("--strem"), "{err}");
    }

    #[test]
    fn help_and_version_are_not_failures() {
        let d = Defaults {
            app: Some("orders-app".into()),
            ..Defaults::default()
        };
        let help = parse(&["--help"], &[], &d).unwrap_err();
        assert!(help.is_help());
        let text = help.to_string();
        for needle in [
            "--stream <NAME>",
            "[env: KCL_STREAM]",
            "--app <NAME>",
            "[env: KCL_APP] [default: orders-app]",
            "--table <NAME>",
            "--worker-id <ID>",
            "--position <POS>",
            "KCL_POSITION",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        let version = parse(&["--version"], &[], &d).unwrap_err();
        assert!(version.is_help());
        assert!(version.to_string().contains("svc 1.2.3"), "{version}");
    }

    #[test]
    fn names_the_worker_would_refuse_are_errors_naming_their_origin() {
        let d = Defaults::default();
        let err = parse(
            &["--app", "orders-app"],
            &[("KCL_STREAM", "bad stream!")],
            &d,
        );
        let err = err.unwrap_err().to_string();
        assert!(err.starts_with("invalid KCL_STREAM: "), "{err}");
        // The table defaults to the application name: a name too short for a table.
        let err = parse(&["--stream", "s", "--app", "a"], &[], &d)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid --app: "), "{err}");
        let defaults = Defaults {
            table: Some("t".into()),
            ..Defaults::default()
        };
        let err = parse(&["--stream", "s", "--app", "orders-app"], &[], &defaults);
        let err = err.unwrap_err().to_string();
        assert!(
            err.starts_with("invalid --table (the service's default): "),
            "{err}"
        );
    }
}
