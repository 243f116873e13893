//! Reads a resolv.conf into the result's `dns` section, as host-local's `resolvConf` does.

use cni_spec::error::CniError;
use cni_spec::Dns;
use std::path::Path;

pub fn read(path: &Path) -> Result<Dns, CniError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::io(format!("ipam.resolvConf {}", path.display()), e))?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("domain") => dns.domain = words.next().map(str::to_string),
            Some("search") => dns.search = words.map(str::to_string).collect(),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_usual_lines() {
        let d =
            super::parse("# c\nnameserver 10.96.0.10\nsearch a.svc b\noptions ndots:5\ndomain x\n");
        assert_eq!(d.nameservers, vec!["10.96.0.10"]);
        assert_eq!(d.search, vec!["a.svc", "b"]);
        assert_eq!(d.options, vec!["ndots:5"]);
        assert_eq!(d.domain.as_deref(), Some("x"));
    }
}
