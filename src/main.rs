fn main() -> std::process::ExitCode {
    swav::cli::main()
}
