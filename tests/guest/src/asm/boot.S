/*
 * boot.S: PVH entry, AP trampoline, GDT/TSS/page tables, ring-3 entry shims.
 *
 * Assembled through global_asm! in main.rs (AT&T syntax). The only brace
 * expressions in this file are the const operands on the next lines, which
 * tie the layout to the Rust constants; braces must not appear anywhere else.
 *
 * CPL0 code here runs EMULATED (about 2 M instructions/s on the development
 * host) and must use plain integer instructions only: every instruction
 * counts towards the time to the first serial output.
 */
.set MAX_CPUS, {MAX_CPUS}
.set USTACK_SIZE, {USTACK_SIZE}
.set CPL0_STACK_SIZE, {CPL0_STACK_SIZE}
.set IST_SIZE, {IST_SIZE}
.set FAULT_STACK_SIZE, {FAULT_STACK_SIZE}
.set GATE_COUNT, {GATE_COUNT}
.set AP_TRAMPOLINE, {AP_TRAMPOLINE}

/* GDT selectors (see gdt below). */
.set KCODE, 0x08
.set KDATA, 0x10
.set UDATA, 0x1b            /* 0x18 | RPL3 */
.set UCODE, 0x23            /* 0x20 | RPL3 */
.set TSS0_SEL, 0x30         /* TSS of cpu N: 0x30 + 16 * N */

.set CR4_BOOT, 0x620        /* PAE | OSFXSR | OSXMMEXCPT: SSE usable at CPL3 */
.set CR0_BOOT, 0x80000023   /* PG | NE | MP | PE (EM, TS clear) */
.set MSR_EFER, 0xc0000080
.set EFER_LME, 0x100
.set RFLAGS_USER, 0x2       /* ring 3 starts with IF=0; it enables IF via the gate */

/* ------------------------------------------------------------------------
 * PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen".
 * The descriptor is 8 bytes like Linux's (QEMU reads a size_t there,
 * linux-loader reads a u32); the entry address fits in the low 32 bits.
 * ---------------------------------------------------------------------- */
.section .note.Xen, "a", @note
.balign 4
.long 4                     /* namesz */
.long 8                     /* descsz */
.long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.quad pvh_start32

/* ------------------------------------------------------------------------
 * BSP entry: 32-bit protected mode, paging off, flat segments,
 * EBX = physical address of struct hvm_start_info.
 * 15 instructions here + 18 in long_entry, then iretq to ring 3 with
 * esi = start_info, ebp:edi = TSC at entry (for the boot-time report).
 * ---------------------------------------------------------------------- */
.section .text.boot, "ax"
.code32
.globl pvh_start32
pvh_start32:
    rdtsc
    mov %eax, %edi                  /* TSC at entry, low */
    mov %edx, %ebp                  /* TSC at entry, high */
    mov %ebx, %esi                  /* start_info */
    lgdt gdtr
    mov $CR4_BOOT, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    mov $EFER_LME, %eax
    xor %edx, %edx
    wrmsr
    mov $CR0_BOOT, %eax
    mov %eax, %cr0
    ljmp $KCODE, $long_entry

.code64
long_entry:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lidt idtr
    /* Patch the base of TSS 0 into its descriptor (the other CPUs'
     * descriptors are written by ring 3 before the APs start). */
    mov $tss_array, %eax
    mov %ax, gdt_tss + 2
    shr $16, %eax
    mov %al, gdt_tss + 4
    mov %ah, gdt_tss + 7
    mov $TSS0_SEL, %eax
    ltr %ax
    mov $(cpl0_stacks + CPL0_STACK_SIZE), %esp
    push $UDATA
    push $(ustacks + USTACK_SIZE)
    push $RFLAGS_USER
    push $UCODE
    push $bsp_entry_user
    iretq

/* ------------------------------------------------------------------------
 * AP trampoline: copied by ring 3 to AP_TRAMPOLINE (SIPI vector
 * AP_TRAMPOLINE >> 12). Real mode, CS = AP_TRAMPOLINE >> 4, IP = 0.
 * Goes straight from real mode to long mode (PE and PG set together).
 * ---------------------------------------------------------------------- */
.section .rodata.trampoline, "a"
.code16
.globl ap_tramp_start
.globl ap_tramp_end
ap_tramp_start:
    cli
    lgdtl %cs:(ap_tramp_gdtr - ap_tramp_start)
    movl $CR4_BOOT, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    movl $EFER_LME, %eax
    xorl %edx, %edx
    wrmsr
    movl $CR0_BOOT, %eax
    movl %eax, %cr0
    ljmpl $KCODE, $ap_entry64
.balign 8
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
.code64

/* AP in long mode at CPL0: ap_boot_cpu (written by the BSP before the SIPI)
 * says which cpu this is. Loads its TSS and drops to ring 3 (ap_entry_user). */
.section .text.boot, "ax"
ap_entry64:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lidt idtr
    mov ap_boot_cpu, %edi
    mov %edi, %eax
    shl $4, %eax
    add $TSS0_SEL, %eax
    ltr %ax
    lea 1(%rdi), %rax
    imul $CPL0_STACK_SIZE, %rax, %rsp
    add $cpl0_stacks, %rsp
    lea 1(%rdi), %rax
    imul $USTACK_SIZE, %rax, %rax
    add $ustacks, %rax
    push $UDATA
    push %rax
    push $RFLAGS_USER
    push $UCODE
    push $ap_entry_user
    iretq

/* ------------------------------------------------------------------------
 * Ring-3 entry shims (CPL3 from here on).
 * ---------------------------------------------------------------------- */
.section .text.entry, "ax"
/* esi = start_info paddr, ebp:edi = entry TSC, rsp = top of ustack 0
 * (16-byte aligned). Upper register halves are undefined after 32-bit mode. */
.globl bsp_entry_user
bsp_entry_user:
    mov %esi, %r12d
    mov %edi, %r13d
    mov %ebp, %eax
    shl $32, %rax
    or %rax, %r13
    fninit
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    cld
    rep stosb
    mov %r12, %rdi
    mov %r13, %rsi
    call bsp_main
    ud2

/* rdi = cpu index. */
.globl ap_entry_user
ap_entry_user:
    fninit
    call ap_main
    ud2

/* Entered by exc_entry (cpl0.S) on the per-cpu fault stack:
 * rdi = vector, rsi = rip, rdx = cr2, rcx = error code, r8 = cpu, r9 = cs. */
.globl fault_entry_user
fault_entry_user:
    call fault_report
    ud2

/* ------------------------------------------------------------------------
 * Page tables: identity map of 0..4 GiB, user accessible (U/S=1, R/W=1).
 * 0..2 MiB uses 4 KiB pages so that page 0 can be unmapped once the boot
 * data is copied (mem::unmap_page0; null pointers then fault); 2 MiB..3 GiB are 2 MiB write-back pages; 3..4 GiB (PCI BARs,
 * ECAM, IOAPIC, LAPIC) are 2 MiB pages with PCD|PWT. Ring 3 may add PDPT
 * entries 4..63 for RAM above 4 GiB (mem.rs).
 * ---------------------------------------------------------------------- */
.section .data.pagetables, "aw", @progbits
.balign 4096
.globl pml4
pml4:
    .quad pdpt + 0x07
    .fill 511, 8, 0
.globl pdpt
pdpt:
    .quad pd_low + 0x0007
    .quad pd_low + 0x1007
    .quad pd_low + 0x2007
    .quad pd_low + 0x3007
    .fill 508, 8, 0
pd_low:
    .quad pt_first + 0x07
    .set pgaddr, 0x200000
    .rept 1535
    .quad pgaddr + 0x87                 /* P | RW | US | PS */
    .set pgaddr, pgaddr + 0x200000
    .endr
    .rept 512
    .quad pgaddr + 0x9f                 /* P | RW | US | PWT | PCD | PS */
    .set pgaddr, pgaddr + 0x200000
    .endr
.globl pt_first
pt_first:
    .set pgaddr, 0
    .rept 512
    .quad pgaddr + 0x07
    .set pgaddr, pgaddr + 0x1000
    .endr

/* ------------------------------------------------------------------------
 * GDT, IDTR, TSSs.
 * ---------------------------------------------------------------------- */
.section .data.cpl0, "aw", @progbits
.balign 16
.globl gdt
gdt:
    .quad 0                             /* 0x00 null */
    .quad 0x00af9a000000ffff            /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff            /* 0x10 kernel data */
    .quad 0x00cff2000000ffff            /* 0x18 user data */
    .quad 0x00affa000000ffff            /* 0x20 user code, 64-bit */
    .quad 0                             /* 0x28 unused */
.globl gdt_tss
gdt_tss:                                /* 0x30: 16-byte TSS descriptors, one per cpu */
    .rept MAX_CPUS
    .quad 0x0000890000000067            /* limit 103, type 9 (available 64-bit TSS), P; base patched */
    .quad 0
    .endr
gdt_end:

.balign 16
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 16
idtr:
    .word 4095
    .quad IDT
.balign 16
.globl null_idtr
null_idtr:
    .word 0
    .quad 0

/* Which cpu the next AP to start is (written by ring 3 before each SIPI). */
.balign 4
.globl ap_boot_cpu
ap_boot_cpu:
    .long 0

/* 64-bit TSSs, 128 bytes apart. RSP0 = top of the cpu's CPL0 stack block,
 * IST1 (NMI, #DF, #MC) = top of the low IST_SIZE bytes of the same block. */
.balign 128
.globl tss_array
tss_array:
    .set cpuidx, 0
    .rept MAX_CPUS
    .long 0
    .quad cpl0_stacks + (cpuidx + 1) * CPL0_STACK_SIZE   /* rsp0 */
    .quad 0, 0, 0                                       /* rsp1, rsp2, reserved */
    .quad cpl0_stacks + cpuidx * CPL0_STACK_SIZE + IST_SIZE  /* ist1 */
    .fill 6, 8, 0                                       /* ist2..ist7 */
    .quad 0
    .word 0
    .word 104                                           /* no I/O bitmap */
    .fill 24, 1, 0                                      /* pad to 128 */
    .set cpuidx, cpuidx + 1
    .endr

/* ------------------------------------------------------------------------
 * Stacks (NOLOAD, never zeroed).
 *   ustacks:      ring-3 stack of cpu N = [ustacks + N*USTACK_SIZE, +USTACK_SIZE)
 *   cpl0_stacks:  cpu N block [IST stack | kernel stack]; cpu = (rsp - cpl0_stacks) / size
 *   fault_stacks: ring-3 stack for the exception reporter of cpu N
 * ---------------------------------------------------------------------- */
.section .stacks, "aw", @nobits
.balign 65536
.globl ustacks
ustacks:
    .skip MAX_CPUS * USTACK_SIZE
.balign 16384
.globl cpl0_stacks
cpl0_stacks:
    .skip MAX_CPUS * CPL0_STACK_SIZE
.globl cpl0_stacks_end
cpl0_stacks_end:
.balign 16384
.globl fault_stacks
fault_stacks:
    .skip MAX_CPUS * FAULT_STACK_SIZE
.globl fault_stacks_end
fault_stacks_end:

.text
