//! Man pages and shell completions generated from a program's clap
//! definition, so the manuals and completions never drift from the flags.
//! Both binaries have a hidden `--generate-docs DIR`; `resources/gen-docs.sh`
//! runs them into `target/man/` and `target/completions/`.

use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes `DIR/man/NAME.1` (and `NAME-SUBCOMMAND.1` for each subcommand)
/// and `DIR/completions/` for bash (`NAME`), zsh (`_NAME`) and fish
/// (`NAME.fish`).
pub fn generate(mut command: clap::Command, dir: &Path) -> io::Result<()> {
    let name = command.get_name().to_string();
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    command.build();
    write_man(&command, &name, &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, &name, &completions)?;
    }
    Ok(())
}

fn write_man(command: &clap::Command, page: &str, dir: &Path) -> io::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(command.clone().name(page.to_string())).render(&mut out)?;
    std::fs::write(dir.join(format!("{page}.1")), out)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_man(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
