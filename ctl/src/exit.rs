//! The exit codes of kairosctl, the same for every subcommand, so scripts
//! can tell "the answer is no" from "my command is wrong" from "try again
//! later" (docs/KAIROSCTL.md, "Exit codes").

/// Done: the server answered 2xx (a `task add --file` run: every line sent
/// or already pending).
pub const OK: u8 = 0;
/// The server answered with an error: not found (404), a conflict (409,
/// e.g. cancelling a running task; the state is printed), refused input
/// (400, 413), or any other status not listed below; a `task add --file`
/// run with lines that failed.
pub const ANSWERED_ERROR: u8 = 1;
/// Usage or configuration: bad flags or arguments (clap's own errors), an
/// unreadable file, a setting that is wrong, a missing or wrong API token
/// (401): nothing useful was sent.
pub const USAGE: u8 = 2;
/// Cannot reach the server: no answer from the scheduler (over HTTP) or
/// Redis (in process), or 503 (the scheduler cannot reach Redis or
/// RabbitMQ). Trying again later may work.
pub const UNREACHABLE: u8 = 3;

/// The exit code an HTTP answer with `status` ends kairosctl with.
pub fn for_status(status: u16) -> u8 {
    match status {
        200..=299 => OK,
        401 => USAGE,
        503 => UNREACHABLE,
        _ => ANSWERED_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_codes() {
        assert_eq!(for_status(200), OK);
        assert_eq!(for_status(202), OK);
        assert_eq!(for_status(404), ANSWERED_ERROR);
        assert_eq!(for_status(409), ANSWERED_ERROR);
        assert_eq!(for_status(400), ANSWERED_ERROR);
        assert_eq!(for_status(500), ANSWERED_ERROR);
        assert_eq!(for_status(401), USAGE);
        assert_eq!(for_status(503), UNREACHABLE);
    }
}
