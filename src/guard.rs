//! The gate every ruleset passes before `nft` sees it on the enforcing side:
//! it may touch our table and nothing else.
//!
//! Earlier implementations validated with line regexes, and `add rule inet
//! incus`, `flush table inet incus`, `include` and `delete table ip filter`
//! all passed. This is a tokenizer instead: it understands quoting, comments,
//! line continuations, `;` separators and brace nesting, splits the text
//! into top-level commands, and accepts a command only when its object is
//! `inet <our table>` (or, in host mode, `bridge <our table>`: the same-bridge
//! isolation, see [`check_ruleset_in`]). Then `nft -c` checks the syntax for
//! real.

use crate::model::TableName;
use anyhow::bail;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    quoted: bool,
    line: usize,
}

/// A top-level command: its tokens (a `{ ... }` block is kept as tokens too)
/// and the line it starts on.
#[derive(Debug)]
struct Command {
    tokens: Vec<Token>,
    line: usize,
}

/// Keywords that reach outside the file or outside any table, refused
/// wherever they appear (nft accepts `include` and `define` inside blocks).
const FORBIDDEN_ANYWHERE: &[(&str, &str)] = &[
    ("include", "pulls in another file that was not reviewed"),
    (
        "define",
        "defines variables; the rendered file never needs them",
    ),
    (
        "redefine",
        "defines variables; the rendered file never needs them",
    ),
    (
        "undefine",
        "defines variables; the rendered file never needs them",
    ),
];

/// Verbs that may act on our own table.
const TABLE_VERBS: &[&str] = &["add", "create", "delete", "flush", "insert", "replace"];

/// Objects a verb may name; each is followed by `<family> <table> ...`.
const OBJECTS: &[&str] = &[
    "table",
    "chain",
    "rule",
    "set",
    "map",
    "element",
    "flowtable",
    "counter",
    "quota",
    "limit",
    "ct",
    "secmark",
    "synproxy",
];

/// The table families a single-table mode (router, routing) touches.
pub const INET_ONLY: &[&str] = &["inet"];

/// The families host mode manages under one table name: the isolation
/// between domains (`inet`) and the isolation inside a domain (`bridge`,
/// optional: older files have none).
pub const HOST_FAMILIES: &[&str] = &["inet", "bridge"];

/// Checks that `text` only touches `table inet <table>`. The error quotes
/// the offending line.
pub fn check_ruleset(text: &str, table: &TableName) -> anyhow::Result<()> {
    check_ruleset_in(text, table, INET_ONLY)
}

/// Checks that `text` only touches `table <family> <table>` for the given
/// `families` (`inet` first, and always defined). The error quotes the
/// offending line.
pub fn check_ruleset_in(text: &str, table: &TableName, families: &[&str]) -> anyhow::Result<()> {
    let lines: Vec<&str> = text.lines().collect();
    let quote = |line: usize| lines.get(line - 1).map(|l| l.trim()).unwrap_or("");
    let tokens = tokenize(text)?;
    for token in &tokens {
        if token.quoted {
            continue;
        }
        if let Some((word, why)) = FORBIDDEN_ANYWHERE.iter().find(|(w, _)| *w == token.text) {
            bail!(
                "line {}: `{}` is refused: `{word}` {why}",
                token.line,
                quote(token.line)
            );
        }
        if token.text.starts_with('$') {
            bail!(
                "line {}: `{}` is refused: variables are not used in rendered rulesets",
                token.line,
                quote(token.line)
            );
        }
    }
    let commands = split_commands(tokens)?;
    if commands.is_empty() {
        bail!("the ruleset is empty: refusing to load nothing in place of table inet {table}");
    }
    let mut defines_table = false;
    for command in &commands {
        match check_command(command, table, families) {
            Ok(defined) => defines_table |= defined == Some("inet"),
            Err(why) => bail!(
                "line {}: `{}` is refused: {why}; only {} may be touched",
                command.line,
                quote(command.line),
                families
                    .iter()
                    .map(|family| format!("table {family} {table}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        }
    }
    if !defines_table {
        bail!("the ruleset never defines table inet {table}: it is not a rendered ruleset for this table");
    }
    Ok(())
}

/// Returns the family of our table the command defines (creates or fills),
/// if it defines one.
fn check_command<'a>(
    command: &'a Command,
    table: &TableName,
    families: &[&str],
) -> Result<Option<&'a str>, String> {
    let words: Vec<&str> = command.tokens.iter().map(|t| t.text.as_str()).collect();
    let (verb, rest) = match words.first() {
        Some(&"table") => ("add", &words[..]),
        Some(verb) if TABLE_VERBS.contains(verb) => (*verb, &words[1..]),
        Some(&"list") | Some(&"reset") | Some(&"monitor") | Some(&"export") | Some(&"import")
        | Some(&"describe") | Some(&"rename") | Some(&"destroy") => {
            return Err(format!(
                "`{}` is not a command a rendered ruleset uses",
                words[0]
            ));
        }
        Some(other) => return Err(format!("unknown command `{other}`")),
        None => return Ok(None),
    };
    let object = rest.first().copied().unwrap_or("");
    if object == "ruleset" {
        return Err(format!("`{verb} ruleset` acts on every table"));
    }
    if !OBJECTS.contains(&object) {
        return Err(format!("`{verb} {object}` is not an object of a table"));
    }
    // `ct helper`, `ct timeout`, `ct expectation` objects take one more word.
    let spec_at = if object == "ct" { 2 } else { 1 };
    let family = rest.get(spec_at).copied();
    let name = rest.get(spec_at + 1).copied();
    match (family, name) {
        (Some(family), Some(name)) if families.contains(&family) && name == table.as_str() => {}
        (Some(family), Some(name))
            if ["ip", "ip6", "inet", "arp", "bridge", "netdev"].contains(&family) =>
        {
            return Err(format!("it acts on table {family} {name}"));
        }
        (Some(name), _) => {
            // No family given: nft then means `ip`, which is not ours.
            return Err(format!(
                "it names table {name} without a family (nft reads that as `ip {name}`)"
            ));
        }
        (None, _) => return Err("it names no table".to_string()),
    }
    Ok((object == "table" && verb != "delete" && verb != "flush")
        .then_some(family)
        .flatten())
}

/// Table names other managers create (in any family: our `inet` table of
/// the same name would still be theirs to their tools and operators).
/// Rendering and applying `table: incus` once replaced Incus's own table.
const RESERVED_TABLE_NAMES: &[(&str, &str)] = &[
    ("incus", "Incus"),
    ("lxd", "LXD"),
    ("filter", "iptables-nft and distribution defaults"),
    ("nat", "iptables-nft and distribution defaults"),
    ("mangle", "iptables-nft"),
    ("raw", "iptables-nft"),
    ("security", "iptables-nft"),
    ("broute", "ebtables-nft"),
    ("firewalld", "firewalld"),
    ("firewalld_policy_drop", "firewalld"),
    ("docker", "Docker"),
    ("docker_user", "Docker"),
    ("libvirt", "libvirt"),
    ("libvirt_network", "libvirt"),
    ("netavark", "Podman (netavark)"),
    ("podman", "Podman"),
    ("kube_proxy", "Kubernetes"),
    ("kube-proxy", "Kubernetes"),
    ("cni", "CNI plugins"),
    ("crowdsec", "CrowdSec"),
    ("crowdsec6", "CrowdSec"),
    ("fail2ban", "fail2ban"),
    ("f2b-table", "fail2ban"),
    ("sshguard", "sshguard"),
    ("ufw", "ufw"),
    ("nixos-fw", "NixOS"),
    ("tailscale", "Tailscale"),
    ("waydroid", "Waydroid"),
];

/// Refuses a table name that another manager uses.
pub fn check_table_name(table: &TableName) -> anyhow::Result<()> {
    let name = table.as_str();
    if let Some((_, owner)) = RESERVED_TABLE_NAMES
        .iter()
        .find(|(reserved, _)| reserved.eq_ignore_ascii_case(name))
    {
        bail!(
            "table name {name:?} is used by {owner}: this module never replaces another \
             manager's table; choose another name (the default is \"anklume\")"
        );
    }
    Ok(())
}

/// Words that may follow `log` as its options, each with one argument.
const LOG_OPTIONS: &[&str] = &[
    "prefix",
    "level",
    "group",
    "snaplen",
    "queue-threshold",
    "flags",
];

/// Removes every `log` statement (with its options) from `text`, for a
/// kernel that refuses `log`: the rules keep their matches and verdicts, so
/// the ruleset is exactly as strict, only silent. Returns the text and how
/// many statements were removed.
pub fn strip_log_statements(text: &str) -> (String, usize) {
    let mut removed = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            // (start, end, quoted) of each word outside comments.
            let mut words: Vec<(usize, usize, bool)> = Vec::new();
            let bytes = line.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'#' => break,
                    b'"' => {
                        let start = i;
                        i += 1;
                        while i < bytes.len() && bytes[i] != b'"' {
                            i += 1;
                        }
                        i = (i + 1).min(bytes.len());
                        words.push((start, i, true));
                    }
                    c if c.is_ascii_whitespace() || c == b';' || c == b'{' || c == b'}' => i += 1,
                    _ => {
                        let start = i;
                        while i < bytes.len()
                            && !bytes[i].is_ascii_whitespace()
                            && !matches!(bytes[i], b';' | b'{' | b'}' | b'"' | b'#')
                        {
                            i += 1;
                        }
                        words.push((start, i, false));
                    }
                }
            }
            let word = |k: usize| &line[words[k].0..words[k].1];
            let mut cuts: Vec<(usize, usize)> = Vec::new();
            let mut k = 0;
            while k < words.len() {
                if !words[k].2 && word(k) == "log" {
                    let start = words[k].0;
                    let mut end = words[k].1;
                    k += 1;
                    while k + 1 < words.len() && !words[k].2 && LOG_OPTIONS.contains(&word(k)) {
                        end = words[k + 1].1;
                        k += 2;
                    }
                    cuts.push((start, end));
                    removed += 1;
                } else {
                    k += 1;
                }
            }
            let mut out = line.to_string();
            for (start, end) in cuts.into_iter().rev() {
                // Take one separating space with the statement.
                let end = if out[end..].starts_with(' ') {
                    end + 1
                } else {
                    end
                };
                out.replace_range(start..end, "");
            }
            out
        })
        .collect();
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    (out, removed)
}

fn tokenize(text: &str) -> anyhow::Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut word = String::new();
    let mut word_line = 1;
    let flush = |word: &mut String, tokens: &mut Vec<Token>, line: usize| {
        if !word.is_empty() {
            tokens.push(Token {
                text: std::mem::take(word),
                quoted: false,
                line,
            });
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                flush(&mut word, &mut tokens, word_line);
                for c in chars.by_ref() {
                    if c == '\n' {
                        tokens.push(Token {
                            text: "\n".into(),
                            quoted: false,
                            line,
                        });
                        line += 1;
                        break;
                    }
                }
            }
            '"' => {
                flush(&mut word, &mut tokens, word_line);
                let start = line;
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\n') | None => {
                            bail!("line {start}: unterminated quoted string")
                        }
                        Some(c) => s.push(c),
                    }
                }
                tokens.push(Token {
                    text: s,
                    quoted: true,
                    line: start,
                });
            }
            '\\' if chars.peek() == Some(&'\n') => {
                // Line continuation: the command goes on.
                chars.next();
                flush(&mut word, &mut tokens, word_line);
                line += 1;
            }
            '\n' | ';' | '{' | '}' => {
                flush(&mut word, &mut tokens, word_line);
                tokens.push(Token {
                    text: c.to_string(),
                    quoted: false,
                    line,
                });
                if c == '\n' {
                    line += 1;
                }
            }
            c if c.is_whitespace() || c == ',' => flush(&mut word, &mut tokens, word_line),
            c => {
                if word.is_empty() {
                    word_line = line;
                }
                word.push(c);
            }
        }
    }
    flush(&mut word, &mut tokens, word_line);
    Ok(tokens)
}

/// Splits tokens into top-level commands at newlines and `;` outside braces.
fn split_commands(tokens: Vec<Token>) -> anyhow::Result<Vec<Command>> {
    let mut commands = Vec::new();
    let mut current: Vec<Token> = Vec::new();
    let mut depth = 0usize;
    // A command ends with its block: `table inet t { } flush ruleset` (joined
    // by a line continuation) must not pass as one command on our table.
    let mut block_closed = false;
    for token in tokens {
        let separator = !token.quoted && matches!(token.text.as_str(), "\n" | ";");
        if block_closed && depth == 0 && !separator {
            bail!(
                "line {}: `{}` follows a closed block on the same command",
                token.line,
                token.text
            );
        }
        if !token.quoted {
            match token.text.as_str() {
                "{" => depth += 1,
                "}" => {
                    depth = depth.checked_sub(1).ok_or_else(|| {
                        anyhow::anyhow!("line {}: `}}` without a matching `{{`", token.line)
                    })?;
                    block_closed = depth == 0;
                }
                "\n" | ";" if depth == 0 => {
                    block_closed = false;
                    if !current.is_empty() {
                        let line = current[0].line;
                        commands.push(Command {
                            tokens: std::mem::take(&mut current),
                            line,
                        });
                    }
                    continue;
                }
                "\n" | ";" => continue,
                _ => {}
            }
        }
        current.push(token);
    }
    if depth != 0 {
        bail!("unbalanced braces: {depth} block(s) are never closed");
    }
    if !current.is_empty() {
        let line = current[0].line;
        commands.push(Command {
            tokens: current,
            line,
        });
    }
    Ok(commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableName {
        TableName::new("anklume").unwrap()
    }

    const GOOD: &str = "table inet anklume {}\ndelete table inet anklume\ntable inet anklume {\n\tset s { type ifname; elements = { \"net-a\", \"net-b\" } }\n\tchain c { type filter hook forward priority -1; policy accept; iifname @s drop; }\n}\n";

    #[test]
    fn names_of_other_managers_tables_are_refused() {
        for name in ["incus", "filter", "nat", "firewalld", "docker", "INCUS"] {
            let Ok(table) = TableName::new(name) else {
                continue;
            };
            let err = check_table_name(&table).unwrap_err().to_string();
            assert!(err.contains("never replaces"), "{name}: {err}");
        }
        check_table_name(&table()).unwrap();
    }

    #[test]
    fn log_statements_are_stripped_and_verdicts_kept() {
        let text = "\t\tlimit name \"b\" log prefix \"FW-DENY log \" level info\n\t\tct state invalid log prefix \"x\" drop\n\t\t# log here\n\t\tiifname \"log\" accept\n";
        let (out, n) = strip_log_statements(text);
        assert_eq!(n, 2);
        assert_eq!(
            out,
            "\t\tlimit name \"b\" \n\t\tct state invalid drop\n\t\t# log here\n\t\tiifname \"log\" accept\n"
        );
    }

    #[test]
    fn accepts_a_rendered_ruleset() {
        check_ruleset(GOOD, &table()).unwrap();
    }

    #[test]
    fn accepts_commands_on_our_table() {
        let text = "add table inet anklume\nadd chain inet anklume c { type filter hook forward priority -1; }\nadd rule inet anklume c drop\n";
        check_ruleset(text, &table()).unwrap();
    }

    #[test]
    fn refuses_everything_that_touches_another_table() {
        let hostile = [
            ("flush ruleset", "flush ruleset"),
            ("add rule inet incus fwd drop", "inet incus"),
            ("flush table inet incus", "inet incus"),
            ("include \"/etc/evil.nft\"", "`include`"),
            ("delete table ip filter", "ip filter"),
            ("table ip anklume { }", "ip anklume"),
            ("table anklume { }", "without a family"),
            ("table inet anklume2 { }", "inet anklume2"),
            ("list ruleset", "`list`"),
            ("delete rule inet incus fwd handle 4", "inet incus"),
            ("add element inet incus s { 1.2.3.4 }", "inet incus"),
            ("table netdev anklume { }", "netdev anklume"),
            ("define x = 1", "`define`"),
            (
                "add ct helper inet incus h { type \"ftp\" protocol tcp; }",
                "inet incus",
            ),
            ("rename chain inet anklume a b", "`rename`"),
        ];
        for (line, expected) in hostile {
            let text = format!("{GOOD}{line}\n");
            let err = check_ruleset(&text, &table()).unwrap_err().to_string();
            assert!(err.contains(expected), "{line}: {err}");
            assert!(err.contains(&format!("line 7: `{line}`")), "{line}: {err}");
        }
    }

    #[test]
    fn hostile_text_hidden_in_blocks_or_after_separators_is_found() {
        for text in [
            "table inet anklume { include \"/x\" }",
            "table inet anklume {}; flush ruleset",
            "table inet anklume {} ; table inet incus { }",
            "table inet anklume {\n}\n\\\nflush ruleset",
        ] {
            assert!(check_ruleset(text, &table()).is_err(), "{text}");
        }
    }

    #[test]
    fn quoted_and_commented_words_do_not_count() {
        let text = "# flush ruleset\ntable inet anklume { chain c { log prefix \"include flush ruleset\" } }\n";
        check_ruleset(text, &table()).unwrap();
    }

    #[test]
    fn the_bridge_table_of_our_name_is_accepted_only_where_the_mode_manages_it() {
        let text = format!(
            "{GOOD}table bridge anklume {{}}\ndelete table bridge anklume\ntable bridge anklume {{\n\tchain c {{ type filter hook forward priority -1; policy accept; ether saddr 00:11:22:33:44:55 drop; }}\n}}\n"
        );
        check_ruleset_in(&text, &table(), HOST_FAMILIES).unwrap();
        let err = check_ruleset(&text, &table()).unwrap_err().to_string();
        assert!(err.contains("bridge anklume"), "{err}");
        for (line, expected) in [
            ("table bridge filter { }", "bridge filter"),
            ("delete table bridge anklume2", "bridge anklume2"),
            ("table netdev anklume { }", "netdev anklume"),
        ] {
            let err = check_ruleset_in(&format!("{text}{line}\n"), &table(), HOST_FAMILIES)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{line}: {err}");
        }
        // The inet table stays required: a bridge table alone is not a
        // rendered ruleset.
        let bridge_only = "table bridge anklume { chain c { } }\n";
        let err = check_ruleset_in(bridge_only, &table(), HOST_FAMILIES)
            .unwrap_err()
            .to_string();
        assert!(err.contains("never defines table inet"), "{err}");
    }

    #[test]
    fn refuses_text_without_our_table_or_malformed() {
        assert!(check_ruleset("", &table()).is_err());
        assert!(check_ruleset("delete table inet anklume\n", &table()).is_err());
        assert!(check_ruleset("table inet anklume {", &table()).is_err());
        assert!(check_ruleset("table inet anklume { \"x }", &table()).is_err());
    }
}
