//! Test plugin `escaper`: `validate-write` tries to escape the sandbox (read a file, list
//! `/`, open a TCP connection, read the environment) and always rejects, with a reason that
//! says what happened to each attempt, e.g.
//! `fs-read: denied (…); fs-list: denied (…); net: denied (…); env: 0 vars`.
//! The host test asserts that every attempt was denied and the environment is empty.

use flagstone_sdk::{Hook, Plugin, PluginInfo, Write};

struct Escaper;

impl Plugin for Escaper {
    fn info() -> PluginInfo {
        PluginInfo::new("escaper", env!("CARGO_PKG_VERSION"))
            .prefixes(["escape/"])
            .hooks([Hook::ValidateWrite])
    }

    fn validate_write(_write: Write) -> Result<(), String> {
        let fs_read = match std::fs::read("/etc/hostname") {
            Ok(bytes) => format!("ALLOWED ({} bytes)", bytes.len()),
            Err(e) => format!("denied ({e})"),
        };
        let fs_list = match std::fs::read_dir("/") {
            Ok(entries) => format!("ALLOWED ({} entries)", entries.count()),
            Err(e) => format!("denied ({e})"),
        };
        let net = match std::net::TcpStream::connect("127.0.0.1:1") {
            Ok(_) => "ALLOWED (connected)".to_owned(),
            Err(e) => format!("denied ({e})"),
        };
        let env = std::env::vars_os().count();
        Err(format!(
            "fs-read: {fs_read}; fs-list: {fs_list}; net: {net}; env: {env} vars"
        ))
    }
}

flagstone_sdk::export_plugin!(Escaper);
