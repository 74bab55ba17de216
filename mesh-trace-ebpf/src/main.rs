//! mesh-trace's kernel programs. One module per hook family; this file only
//! declares them.
#![no_std]
#![no_main]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves programs cannot panic; this is never reached.
    loop {}
}
