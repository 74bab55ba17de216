use std::process::ExitCode;

fn main() -> ExitCode {
    mesh_trace::cli::main()
}
