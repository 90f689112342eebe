//! `vmplant image`: manage an image store (import, commit, ls, info, rm,
//! gc). Results go to standard output as JSON, progress to the log.

use super::CliResult;
use clap::{Args, Subcommand};
use images::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The image store directory (the first import creates it).
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a raw disk image (qcow2 through qemu-img) as image NAME.
    Import {
        name: String,
        file: PathBuf,
        /// Chunk size in KiB of a store this import creates (a power of
        /// two from 4 to 65536); an existing store keeps its own.
        #[arg(long, default_value_t = 512, value_name = "KIB")]
        chunk_kib: u32,
    },
    /// Turn the overlay of a stopped VM into a new layer on top of its
    /// base image: image NAME (only the chunks it changed are stored).
    Commit {
        /// The VM's overlay file.
        #[arg(long, value_name = "FILE")]
        overlay: PathBuf,
        /// The image the overlay was made on.
        #[arg(long, value_name = "IMAGE")]
        base: String,
        name: String,
    },
    /// List the images, one JSON object a line.
    Ls,
    /// An image's layers, size, chunks and the bytes unique to it.
    Info { name: String },
    /// Remove an image (refused while a VM uses it or an image is made on
    /// it); gc frees its chunks.
    Rm { name: String },
    /// Delete the layers and chunks no image references.
    Gc,
}

pub fn run(args: ImageArgs) -> CliResult {
    // Print the whole cause chain ("cannot read chunk ...: No such file").
    image(args).map_err(|e| super::switch::chain(e.as_ref()).into())
}

fn print_json<T: serde::Serialize>(v: &T, pretty: bool) -> Result<(), serde_json::Error> {
    let s = if pretty {
        serde_json::to_string_pretty(v)?
    } else {
        serde_json::to_string(v)?
    };
    println!("{s}");
    Ok(())
}

fn image(args: ImageArgs) -> CliResult {
    let dir = args.store.as_path();
    match args.command {
        ImageCommand::Import {
            name,
            file,
            chunk_kib,
        } => {
            let chunk_size = chunk_kib
                .checked_mul(1024)
                .ok_or_else(|| format!("--chunk-kib {chunk_kib} is too large"))?;
            let store = Store::open_or_create(dir, chunk_size)?;
            let report = store.import(&name, &file, &mut |pct| {
                tracing::info!("import {name}: {pct}%");
            })?;
            print_json(&report, false)?;
        }
        ImageCommand::Commit {
            overlay,
            base,
            name,
        } => {
            let report = open(dir)?.commit(&overlay, &base, &name)?;
            print_json(&report, false)?;
        }
        ImageCommand::Ls => {
            for image in open(dir)?.list()? {
                print_json(&image, false)?;
            }
        }
        ImageCommand::Info { name } => print_json(&open(dir)?.info(&name)?, true)?,
        ImageCommand::Rm { name } => open(dir)?.remove(&name)?,
        ImageCommand::Gc => print_json(&open(dir)?.gc()?, false)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn open(dir: &Path) -> Result<Store, images::StoreError> {
    Store::open(dir)
}
