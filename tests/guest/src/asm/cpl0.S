/*
 * cpl0.S: interrupt/exception stubs and the ud2 call gate (all CPL0 code
 * that runs after boot). Integer instructions only; never touch SSE/x87.
 *
 * IDT layout (the entries are written by ring 3, irq.rs): vector v jumps to
 * isr_table + 16*v. Every IDT entry is a DPL0 interrupt gate (IF cleared on
 * entry); NMI, #DF and #MC use IST1.
 *
 *   vector 2 (NMI)      count in IRQ_COUNTS[2], iretq
 *   vector 6 (#UD)      from CPL3 at bytes 0F 0B: gate call (see below),
 *                       otherwise an exception
 *   vectors 0..31       exception: redirected to the ring-3 reporter
 *   vectors 32..255     lock inc IRQ_COUNTS[v]; LAPIC EOI (not for 255); iretq
 *
 * Gate ABI (ring 3 executes ud2):
 *   in:  rax = service, rdi, rsi, rdx = arguments
 *   out: rax = result (some services also return rdi, rsi, rdx)
 *   clobbered: rax, rcx, rdx, rsi, rdi, r8..r11; preserved: everything else.
 * Services are listed at gate_table; keep gate.rs::svc in sync.
 */

.section .text.cpl0, "ax"
.balign 16
.globl isr_table
isr_table:
.set vec, 0
.rept 256
    .balign 16
    .if vec == 6
        jmp ud_entry
    .elseif vec == 2
        jmp nmi_entry
    .elseif vec < 32
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        push $0                             /* no CPU error code: push a dummy one */
        .endif
        push $vec
        jmp exc_entry
    .else
        push $vec
        jmp irq_entry
    .endif
    .set vec, vec + 1
.endr
.balign 16
.globl isr_table_end
isr_table_end:

/* External interrupt: stack = [vector] + hardware frame. 9 instructions. */
irq_entry:
    push %rax
    movzbl 8(%rsp), %eax
    lock incq IRQ_COUNTS(,%rax,8)
    cmp $0xff, %eax                         /* spurious vector: no EOI */
    je 1f
    mov $0xfee000b0, %eax                   /* LAPIC EOI register */
    movl $0, (%rax)
1:  pop %rax
    add $8, %rsp
    iretq

nmi_entry:
    lock incq IRQ_COUNTS + 16
    iretq

/*
 * Exception: stack = [vector][error][rip][cs][rflags][rsp][ss].
 * The context is abandoned: iretq into fault_entry_user at CPL3 on the cpu's
 * fault stack with rdi = vector, rsi = rip, rdx = cr2, rcx = error,
 * r8 = cpu, r9 = cs (its low 2 bits are the CPL of the fault).
 */
exc_entry:
    mov %rsp, %rax
    sub $cpl0_stacks, %rax
    shr $14, %rax                           /* cpu = (rsp - cpl0_stacks) / CPL0_STACK_SIZE */
    mov %rax, %r8
    mov 0(%rsp), %rdi
    mov 8(%rsp), %rcx
    mov 16(%rsp), %rsi
    mov 24(%rsp), %r9
    mov %cr2, %rdx
    lea 1(%rax), %r10
    imul $FAULT_STACK_SIZE, %r10, %r10
    add $fault_stacks, %r10
    movq $fault_entry_user, 16(%rsp)
    movq $UCODE, 24(%rsp)
    movq $RFLAGS_USER, 32(%rsp)
    mov %r10, 40(%rsp)
    movq $UDATA, 48(%rsp)
    add $16, %rsp
    iretq

/* #UD: stack = hardware frame [rip][cs][rflags][rsp][ss]. The gate path is
 * 10 instructions before the service. */
ud_entry:
    testb $3, 8(%rsp)
    jz 9f                                   /* #UD at CPL0: a real exception */
    mov (%rsp), %r11
    cmpw $0x0b0f, (%r11)
    jne 9f                                  /* not ud2: a real exception */
    add $2, %r11
    mov %r11, (%rsp)
    cmp $GATE_COUNT, %rax
    jae svc_bad
    jmp *gate_table(,%rax,8)
9:  push $0
    push $6
    jmp exc_entry

/* ---------------------------- services -------------------------------- */

/* 0 WRITE(rdi = buf, rsi = len): rep outsb to COM1 THR (KVM batches it). */
svc_write:
    mov %rsi, %rcx
    mov %rdi, %rsi
    mov $0x3f8, %edx
    cld
    rep outsb
    xor %eax, %eax
    iretq

/* 1 READ_SERIAL(rdi = buf, rsi = max) -> rax = bytes read from COM1. */
svc_read_serial:
    xor %ecx, %ecx
1:  cmp %rsi, %rcx
    jae 2f
    mov $0x3fd, %edx                        /* LSR */
    in (%dx), %al
    cmp $0xff, %al                          /* no UART */
    je 2f
    test $1, %al                            /* data ready */
    jz 2f
    mov $0x3f8, %edx                        /* RBR */
    in (%dx), %al
    mov %al, (%rdi,%rcx)
    inc %rcx
    jmp 1b
2:  mov %rcx, %rax
    iretq

/* 2 READ_KBD() -> rax = status << 8 | data if the i8042 output buffer was
 * full, -1 if empty, -2 if there is no controller (status reads 0xff). */
svc_read_kbd:
    in $0x64, %al
    cmp $0xff, %al
    je 2f
    test $1, %al
    jz 1f
    movzbl %al, %ecx
    in $0x60, %al
    movzbl %al, %eax
    shl $8, %ecx
    or %rcx, %rax
    iretq
1:  mov $-1, %rax
    iretq
2:  mov $-2, %rax
    iretq

/* 3 WAIT_IRQ(rdi = &counter or 0, rsi = value seen): if *rdi still equals
 * rsi (or rdi is 0), sti; hlt; cli. Race free: the comparison is done with
 * IF=0 and sti's interrupt shadow covers hlt. */
svc_wait_irq:
    test %rdi, %rdi
    jz 1f
    cmp (%rdi), %rsi
    jne 2f
1:  sti
    hlt
    cli
2:  xor %eax, %eax
    iretq

/* 4 HALT(): cli; hlt forever. */
svc_halt:
    cli
    hlt
    jmp svc_halt

/* 5 POWEROFF(): ACPI HW-reduced sleep control at port 0x3c0 (the VMM's),
 * then PIIX4/ICH9 PM1a_CNT at 0x604 (QEMU pc/q35 with SeaBIOS), then halt. */
svc_poweroff:
    mov $0x3c0, %edx
    mov $0x34, %al                          /* SLP_TYP=5 << 2 | SLP_EN (bit 5) */
    out %al, (%dx)
    mov $0x604, %edx
    mov $0x2000, %eax                       /* SLP_EN, SLP_TYP=0 (S5 in QEMU's DSDT) */
    out %ax, (%dx)
    jmp svc_halt

/* 6 RESET(): i8042 pulse, then 0xcf9, then a triple fault. */
svc_reset:
    mov $0xfe, %al
    out %al, $0x64
    mov $2000, %ecx
1:  dec %ecx
    jnz 1b
    mov $0xcf9, %edx
    mov $0x02, %al
    out %al, (%dx)
    mov $0x06, %al
    out %al, (%dx)
    mov $2000, %ecx
2:  dec %ecx
    jnz 2b
    /* fall through */

/* 7 TRIPLE_FAULT(): empty IDT, then ud2: #UD -> #GP -> #DF -> shutdown. */
svc_triple_fault:
    lidt null_idtr
    ud2

/* 8 CPUID(rdi = leaf, rsi = subleaf) -> rax = eax, rdi = ebx, rsi = ecx, rdx = edx. */
svc_cpuid:
    mov %rbx, %r8
    mov %edi, %eax
    mov %esi, %ecx
    cpuid
    mov %ebx, %edi
    mov %ecx, %esi
    mov %r8, %rbx
    iretq

/* 9 PORT_IN(rdi = port, rsi = size 1|2|4) -> rax. */
svc_port_in:
    mov %edi, %edx
    xor %eax, %eax
    cmp $1, %rsi
    je 1f
    cmp $2, %rsi
    je 2f
    in (%dx), %eax
    iretq
1:  in (%dx), %al
    iretq
2:  in (%dx), %ax
    iretq

/* 10 PORT_OUT(rdi = port, rsi = size 1|2|4, rdx = value). */
svc_port_out:
    mov %rdx, %rax
    mov %edi, %edx
    cmp $1, %rsi
    je 1f
    cmp $2, %rsi
    je 2f
    out %eax, (%dx)
    jmp 3f
1:  out %al, (%dx)
    jmp 3f
2:  out %ax, (%dx)
3:  xor %eax, %eax
    iretq

/* 11 RDMSR(rdi = msr) -> rax = value. A bad MSR faults (#GP at CPL0). */
svc_rdmsr:
    mov %edi, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    iretq

/* 12 WRMSR(rdi = msr, rsi = value). */
svc_wrmsr:
    mov %edi, %ecx
    mov %rsi, %rax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    xor %eax, %eax
    iretq

/* 13 PIT_CALIBRATE(rdi = PIT ticks, < 65536) -> rax = TSC ticks elapsed
 * while PIT channel 2 counted them down (mode 0, gate via port 0x61), or 0
 * if OUT2 never rose (no PIT). */
svc_pit_calibrate:
    in $0x61, %al
    and $0xfc, %al                          /* speaker off, gate low */
    or $0x01, %al                           /* gate high */
    out %al, $0x61
    mov $0xb0, %al                          /* channel 2, lobyte/hibyte, mode 0, binary */
    out %al, $0x43
    mov %edi, %eax
    out %al, $0x42
    mov %ah, %al
    out %al, $0x42
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8
    mov $400000, %ecx
1:  in $0x61, %al
    test $0x20, %al                         /* OUT2 */
    jnz 2f
    dec %ecx
    jnz 1b
    xor %eax, %eax
    iretq
2:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r8, %rax
    iretq

/* 14 SET_IF(rdi = 0|1): clear/set IF in the caller's RFLAGS. */
svc_set_if:
    test %rdi, %rdi
    jz 1f
    orq $0x200, 16(%rsp)
    xor %eax, %eax
    iretq
1:  andq $~0x200, 16(%rsp)
    xor %eax, %eax
    iretq

/* 15 NOP() -> rax = 0 (measures the gate round trip). */
svc_nop:
    xor %eax, %eax
    iretq

/* 16 FLUSH_TLB(): reload CR3 (after ring 3 changed or removed mappings). */
svc_flush_tlb:
    mov %cr3, %rax
    mov %rax, %cr3
    xor %eax, %eax
    iretq

/* 17 CRASH() -> rax = 0 if it returns. Executes, at CPL0, an instruction
 * that the development host's KVM cannot emulate (CPL0 is emulated there):
 * POPCNT, which ends KVM_RUN with KVM_EXIT_INTERNAL_ERROR, suberror 1
 * (emulation failure), i.e. a guest crash as the VMM sees it. Harmless
 * where CPL0 runs on hardware (VT-x/AMD-V): it just runs, and the service
 * returns. There is no instruction that crashes every VMM. */
svc_crash:
    popcnt %rax, %rax
    xor %eax, %eax
    iretq

svc_bad:
    mov $-1, %rax
    iretq

.section .rodata.cpl0, "a"
.balign 8
gate_table:
    .quad svc_write                         /* 0 */
    .quad svc_read_serial                   /* 1 */
    .quad svc_read_kbd                      /* 2 */
    .quad svc_wait_irq                      /* 3 */
    .quad svc_halt                          /* 4 */
    .quad svc_poweroff                      /* 5 */
    .quad svc_reset                         /* 6 */
    .quad svc_triple_fault                  /* 7 */
    .quad svc_cpuid                         /* 8 */
    .quad svc_port_in                       /* 9 */
    .quad svc_port_out                      /* 10 */
    .quad svc_rdmsr                         /* 11 */
    .quad svc_wrmsr                         /* 12 */
    .quad svc_pit_calibrate                 /* 13 */
    .quad svc_set_if                        /* 14 */
    .quad svc_nop                           /* 15 */
    .quad svc_flush_tlb                     /* 16 */
    .quad svc_crash                         /* 17 */
gate_table_end:
.if (gate_table_end - gate_table) != GATE_COUNT * 8
.error "gate_table and GATE_COUNT disagree"
.endif

.text
