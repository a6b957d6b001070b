use clap::Parser;

fn main() {
    let cli = ferry::cli::Cli::parse();
    ferry::logging::init(cli.global.verbose);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = match runtime.block_on(ferry::cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            ferry::errln!("error: {err:#}");
            ferry::cli::exit_code(&err)
        }
    };
    std::process::exit(code);
}
