//! What Linux says about a process: resident memory and CPU time spent.

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// This process's resident set size, from `/proc/self/status`.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status for the memory figure (Linux only)")?;
    parse_vm_rss(&status).context("/proc/self/status has no VmRSS line")
}

/// CPU seconds (user + system, all threads) process `pid` (`None`: this
/// one) has used so far; `None` when unreadable. Counted in 10 ms ticks.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    parse_cpu_ticks(&std::fs::read_to_string(path).ok()?).map(|ticks| ticks / TICKS_PER_SEC)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `utime + stime`, fields 14 and 15 of `stat`; counted after the command
/// name, which is in parentheses and may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<f64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tswitchboard\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss_bytes().expect("Linux") > 0);
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 121 0 0 0 250 40 0 0 20 0 1";
        assert_eq!(parse_cpu_ticks(stat), Some(290.0));
        assert!(cpu_seconds(None).is_some());
    }
}
