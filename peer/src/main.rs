//! halftime-peer: not built yet. See the project's open issues.

fn main() {
    eprintln!("halftime-peer is not built yet: this program does nothing so far.");
    std::process::exit(2);
}
